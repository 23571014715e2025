"""The request chain: one declared order (pinned here and checked against README "How a request flows"),
route steps tried in order, errors turned into decisions by one rule."""

import re
from pathlib import Path

import pytest
from aiohttp import web

from mediator.app import Runtime
from mediator.bulkhead import UpstreamRefused
from mediator.chain import FINISH, RESPONSE, ROUTE, RequestChain, ResponseFiltersStep, ResponseHeadersStep
from mediator.decision import Decision
from mediator.errors import MediatorError
from mediator.facilities import LookupFailed
from mediator.metrics import Metrics
from mediator.pipeline import BodyReadTimeout, BodyTooLarge, Exchange, Pipeline
from mediator.stages import ORDER
from mediator.upstream import UpstreamInvalidAnswer, UpstreamLoginFailed, UpstreamTimeout, UpstreamUnavailable
from tests.conftest import channels_yaml, loaded, write_config

README = Path(__file__).resolve().parents[1] / "README.md"

DECLARED = (
    ("stage", "client_ip"), ("stage", "channel"), ("stage", "ip"), ("stage", "load_shed"),
    ("stage", "authentication"), ("stage", "over_limit"), ("stage", "request"), ("stage", "search"),
    ("stage", "lookup_charge"), ("stage", "authorization"),
    ("stage", "write"), ("stage", "rate_limit"),
    ("route", "capabilities"), ("route", "async_claims"), ("route", "replica"), ("route", "local_answer"),
    ("route", "batch"), ("route", "idempotent_create"), ("route", "forward"),
    ("response", "link_rewrite"), ("response", "fhir_answers"), ("response", "response_filters"),
    ("finish", "response_headers"),
)


def test_the_whole_order_is_pinned():
    assert tuple(("stage", n) for n in ORDER) + tuple(("route", n) for n in ROUTE) \
        + tuple(("response", n) for n in RESPONSE) + tuple(("finish", n) for n in FINISH) == DECLARED


def test_the_runtime_builds_the_declared_chain(tmp_path):
    root = write_config(tmp_path, channels_yaml("http://127.0.0.1:1/api/api_fhir_r4/"))
    chain = Runtime.build(loaded(root), Metrics()).chain
    # Stages without a policy file are absent (rate_limit, and with it over_limit, here); whatever is built is
    # in the declared order.
    assert list(chain.order) == [step for step in DECLARED if step in chain.order]
    assert [s for s in DECLARED if s not in chain.order] == \
        [("stage", "over_limit"), ("stage", "lookup_charge"), ("stage", "rate_limit")]


def _readme_steps() -> list[tuple[str, str]]:
    text = README.read_text()
    section = text[text.index("## How a request flows"):]
    section = section[:section.index("\n## ", 1)]
    rows = [line for line in section.splitlines() if re.match(r"^\| \d+ \|", line)]
    steps = []
    for number, row in enumerate(rows, 1):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == str(number), row
        step = re.match(r"^`([a-z_]+)`", cells[2])
        assert step is not None, row
        steps.append((cells[1], step.group(1)))
    return steps


def test_the_readme_table_is_the_declared_order():
    assert tuple(_readme_steps()) == DECLARED


# --- the chain at work, without sockets ---------------------------------------------------------------------

class _Allow:
    name = "channel"

    async def run(self, exchange):
        return Decision.allowed("channel.ok")


class _Route:
    sends_upstream = False

    def __init__(self, name, answer=None, raises=None, seen=None):
        self.name, self._answer, self._raises, self._seen = name, answer, raises, seen

    async def answer(self, exchange):
        if self._seen is not None:
            self._seen.append(self.name)
        if self._raises is not None:
            raise self._raises
        return self._answer


class _Shape:
    def __init__(self, name, seen=None):
        self.name, self._seen = name, seen

    async def apply(self, exchange, response):
        if self._seen is not None:
            self._seen.append(self.name)
        return response


def _response_steps(seen=None):
    return [_Shape("link_rewrite", seen), _Shape("fhir_answers", seen), ResponseFiltersStep()]


def _chain(route_steps):
    return RequestChain(Pipeline([_Allow()]), route_steps, _response_steps(),
                        [ResponseHeadersStep()])


def _routes(*, replica=None, forward=None, raises=None, seen=None):
    return [_Route("capabilities", seen=seen), _Route("async_claims", seen=seen), _Route("replica", replica, seen=seen),
            _Route("local_answer", seen=seen), _Route("batch", seen=seen),
            _Route("idempotent_create", seen=seen), _Route("forward", forward, raises, seen=seen)]


def _exchange():
    return Exchange(request=None, request_id="rid-12345678")  # type: ignore[arg-type]


def test_steps_must_be_the_declared_ones():
    with pytest.raises(RuntimeError, match="declared"):
        RequestChain(Pipeline([_Allow()]), list(reversed(_routes())), _response_steps(),
                     [ResponseHeadersStep()])


async def test_the_first_route_step_that_answers_ends_the_route():
    seen: list[str] = []
    exchange = _exchange()
    exchange.response_headers["RateLimit"] = '"c";r=9;t=1'
    response = await _chain(_routes(replica=web.Response(status=200, text="r"), seen=seen)).run(exchange)
    assert seen == ["capabilities", "async_claims", "replica"] and response.status == 200
    assert exchange.answered_by == "replica"
    assert response.headers["X-Request-ID"] == "rid-12345678" and response.headers["RateLimit"] == '"c";r=9;t=1'

    seen.clear()
    response = await _chain(_routes(forward=web.Response(status=201), seen=seen)).run(_exchange())
    assert seen == ["capabilities", "async_claims", "replica", "local_answer", "batch", "idempotent_create",
                    "forward"]
    assert response.status == 201


async def test_response_filters_run_on_the_routed_answer():
    exchange = _exchange()
    calls = []

    async def mark(exchange, response):
        calls.append(response.status)
        response.headers["X-Checked"] = "yes"
        return response

    exchange.response_filters.append(mark)
    response = await _chain(_routes(forward=web.Response(status=200))).run(exchange)
    assert calls == [200] and response.headers["X-Checked"] == "yes"


@pytest.mark.parametrize(("error", "status", "reason"), [
    (BodyTooLarge(), 413, "request.body_too_large"),
    (BodyReadTimeout(), 408, "request.body_timeout"),
    (UpstreamRefused("upstream.overloaded", "openIMIS is busy", 3), 503, "upstream.overloaded"),
    (UpstreamTimeout(), 504, "upstream.timeout"),
    (UpstreamInvalidAnswer("text/html"), 502, "upstream.invalid_answer"),
    (UpstreamUnavailable("ClientOSError"), 502, "upstream.unavailable"),
    (UpstreamLoginFailed("login answered 500"), 502, "upstream.unavailable"),
    (KeyError("a bug"), 500, "mediator.internal_error"),
    (LookupFailed("a stage let it escape"), 500, "mediator.internal_error"),   # no reason of its own
])
async def test_an_error_anywhere_becomes_one_decision(error, status, reason):
    exchange = _exchange()
    exchange.response_filters.append(lambda e, r: pytest.fail("no filter runs on an error"))
    response = await _chain(_routes(raises=error)).run(exchange)
    assert response.status == status and response.headers["X-Request-ID"] == "rid-12345678"
    stage, decision = exchange.decisions[-1]
    assert (stage, decision.reason, decision.status) == (reason.split(".")[0], reason, status)
    assert reason.encode() in response.body
    if isinstance(error, MediatorError) and error.reason != "mediator.internal_error":
        assert error.decision() == decision
    if isinstance(error, UpstreamRefused):
        assert response.headers["Retry-After"] == "3"
    if decision.reason == "mediator.internal_error":
        assert b"a bug" not in response.body and b"escape" not in response.body and b"rid-12345678" in response.body
    # The rest of a body that did not arrive in time must not be read as the next request.
    assert response.keep_alive is (False if isinstance(error, BodyReadTimeout) else None)


async def test_an_error_in_a_stage_is_the_same_decision():
    class Slow:
        name = "request"

        async def run(self, exchange):
            raise BodyReadTimeout()

    exchange = _exchange()
    response = await RequestChain(Pipeline([Slow()]), _routes(), _response_steps(),
                                  [ResponseHeadersStep()]).run(exchange)
    assert response.status == 408 and exchange.decisions[-1][1].reason == "request.body_timeout"


async def test_response_steps_run_in_order_on_the_routed_answer_and_not_on_a_denial():
    seen: list[str] = []
    chain = RequestChain(Pipeline([_Allow()]), _routes(forward=web.Response(status=200)), _response_steps(seen),
                         [ResponseHeadersStep()])
    await chain.run(_exchange())
    assert seen == ["link_rewrite", "fhir_answers"]

    class _Deny:
        name = "channel"

        async def run(self, exchange):
            return Decision.denied("channel.none", 404, "no channel")

    seen.clear()
    response = await RequestChain(Pipeline([_Deny()]), _routes(), _response_steps(seen),
                                  [ResponseHeadersStep()]).run(_exchange())
    assert response.status == 404 and seen == []


async def test_fhir_answers_and_the_response_filters_see_the_links_the_client_gets(tmp_path):
    """link_rewrite first: every later response step reads the parsed document with the public links."""
    import json

    from mediator.request_view import RequestView
    from mediator.upstream import UpstreamReply, response_document

    internal = "http://openimis.internal:8000/api/api_fhir_r4/"
    runtime = Runtime.build(loaded(write_config(tmp_path, channels_yaml(internal))), Metrics())
    exchange = Exchange(RequestView.described("GET", "/fhir/Organization/?_count=1"), "rid-12345678")
    for stage in runtime.pipeline.stages[:2]:   # client_ip, channel
        assert (await stage.run(exchange)).allow
    exchange.answered_by = "forward"
    filtered: list[object] = []

    async def facility_filter(exchange, response):   # where authorization's result filter sits
        filtered.append(response_document(response))
        return response

    exchange.response_filters.append(facility_filter)
    bundle = {"resourceType": "Bundle", "type": "searchset", "total": 3,
              "link": [{"relation": "next", "url": f"{internal}Organization/?_count=1&page-offset=2"}],
              "entry": [{"fullUrl": f"{internal}Organization/o-1", "resource": {"resourceType": "Organization",
                                                                               "id": "o-1"}}]}
    received = runtime.upstreams["openimis"].answer(
        UpstreamReply(200, {}, json.dumps(bundle).encode(), "application/json"), fhir_json=False)
    response = received
    for step in runtime.chain.response:
        response = await step.apply(exchange, response)
    document = filtered[0]
    assert document is received.document   # parsed once, on receipt; rewritten in place
    assert document["entry"][0]["fullUrl"] == "https://mediator.example.org/fhir/Organization/o-1"
    assert document["link"][0]["url"].startswith("https://mediator.example.org/fhir/Organization/")
    assert json.loads(response.body) == document
