"""The openIMIS boundary, over real sockets against the stand-in (and small purpose-built servers)."""

import asyncio
import json
import time

import pytest
from aiohttp import web

from mediator.logs import JsonEvent
from mediator.upstream import UpstreamInvalidAnswer
from tests.conftest import channels_yaml, upstream_url


def _last(sandbox, path_part):
    return [r for r in sandbox.requests if path_part in r["path"]][-1]


async def test_logs_in_once_and_reuses_the_token(sandbox, mediator):
    for _ in range(3):
        assert (await mediator.get("/fhir/Medication/")).status == 200
    assert sandbox.logins == 1


async def test_client_credentials_and_hop_by_hop_headers_never_reach_openimis(sandbox, mediator):
    response = await mediator.get("/fhir/Medication", headers={
        "Authorization": "Bearer client-secret-token", "Cookie": "sessionid=abc",
        "Proxy-Authorization": "Basic eA==", "X-Custom": "1", "Connection": "keep-alive, X-Custom",
        "Accept-Language": "fr", "X-Forwarded-Host": "evil.example", "X-Forwarded-For": "6.6.6.6"})
    assert response.status == 200
    sent = _last(sandbox, "/Medication/")["headers"]
    assert sent["Authorization"].startswith("Bearer ") and "client-secret-token" not in sent["Authorization"]
    assert sent["Authorization"][7:] in sandbox.tokens
    for header in ("Cookie", "Proxy-Authorization", "X-Custom"):
        assert header not in sent
    assert sent["Accept-Language"] == "fr"
    assert sent["X-Forwarded-Host"] == "mediator.example.org"
    assert sent["X-Forwarded-Proto"] == "https"
    assert sent["X-Forwarded-For"] == "127.0.0.1"
    assert sent["Accept"] == "application/json"


async def test_trailing_slash_and_query_are_kept(sandbox, mediator):
    response = await mediator.get("/fhir/Medication?_count=1&page-offset=1")
    assert response.status == 200
    sent = _last(sandbox, "/Medication/")
    assert sent["path"] == "/api/api_fhir_r4/Medication/"
    assert sent["query"] == "_count=1&page-offset=1"


async def test_fhir_json_from_clients_is_plain_json_to_openimis(sandbox, mediator):
    claim = {"resourceType": "Claim", "identifier": [{"value": "C1"}]}
    response = await mediator.post("/fhir/Claim", data=json.dumps(claim), headers={
        "Content-Type": "application/fhir+json", "Accept": "application/fhir+json"})
    assert response.status == 201
    assert response.content_type == "application/fhir+json"
    created = await response.json()   # Prefer return=representation by default: the Claim, read back
    assert created["resourceType"] == "Claim"
    assert response.headers["Location"] == f"https://mediator.example.org/fhir/Claim/{created['id']}"
    sent = next(r for r in sandbox.requests if r["method"] == "POST" and r["path"].endswith("/Claim/"))
    assert sent["method"] == "POST" and sent["path"] == "/api/api_fhir_r4/Claim/"
    assert sent["headers"]["Content-Type"] == "application/json"
    # ClaimResponse id equals the Claim id in openIMIS; the poll goes through the same channel.
    poll = await mediator.get(f"/fhir/ClaimResponse/{created['id']}")
    assert poll.status == 200 and (await poll.json())["id"] == created["id"]


async def test_bundle_links_point_at_the_mediator(mediator):
    response = await mediator.get("/fhir/Medication/?_count=1")
    bundle = await response.json()
    assert bundle["link"][0]["url"].startswith("https://mediator.example.org/fhir/Medication/")
    assert all(e["fullUrl"].startswith("https://mediator.example.org/fhir/") for e in bundle["entry"])


async def test_bare_resource_answers_are_wrapped_in_a_searchset(mediator):
    response = await mediator.get("/fhir/Patient?identifier=123456789")
    assert response.status == 200
    bundle = await response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset" and bundle["total"] == 1
    patient = bundle["entry"][0]["resource"]
    assert patient["resourceType"] == "Patient"
    assert bundle["entry"][0]["fullUrl"] == f"https://mediator.example.org/fhir/Patient/{patient['id']}"
    assert bundle["link"] == [{"relation": "self",
                               "url": "https://mediator.example.org/fhir/Patient?identifier=123456789"}]


async def test_bare_resource_answers_pass_through_when_the_channel_says_so(sandbox_server, make_mediator):
    channels = """\
      - name: eligibility
        path: ^/fhir/Patient/?$
        methods: [GET]
        upstream: openimis
        ip_allowlist: [local]
        authentication: none
        fhir_answers: {searchset: as_upstream}
    """
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server), channels=channels))
    response = await client.get("/fhir/Patient?identifier=123456789")
    assert response.status == 200 and (await response.json())["resourceType"] == "Patient"
    assert (await client.get("/fhir/Patient?identifier=999999999")).status == 404


async def test_relogs_once_when_openimis_forgets_the_token(sandbox, mediator):
    assert (await mediator.get("/fhir/Medication/")).status == 200
    sandbox.tokens.clear()  # openIMIS restarted
    assert (await mediator.get("/fhir/Medication/")).status == 200
    assert sandbox.logins == 2


async def test_relogs_before_expiry(sandbox, mediator):
    from mediator.app import RUNTIME

    assert (await mediator.get("/fhir/Medication/")).status == 200
    upstream = mediator.server.app[RUNTIME].current.upstreams["openimis"]
    upstream._token_expires = time.time() + 10  # inside the refresh margin
    assert (await mediator.get("/fhir/Medication/")).status == 200
    assert sandbox.logins == 2


async def test_concurrent_requests_share_one_login(sandbox, mediator):
    results = await asyncio.gather(*(mediator.get("/fhir/Medication/") for _ in range(20)))
    assert [r.status for r in results] == [200] * 20
    assert sandbox.logins == 1


async def test_wrong_credentials_are_502_and_never_leak(sandbox, mediator, monkeypatch):
    monkeypatch.setenv("OPENIMIS_PASSWORD", "wrong-secret")
    response = await mediator.get("/fhir/Medication/")
    assert response.status == 502
    text = await response.text()
    assert "wrong-secret" not in text
    assert json.loads(text)["issue"][0]["details"]["coding"][0]["code"] == "upstream.unavailable"


async def test_upstream_down_is_502(make_mediator, unused_tcp_port):
    client = await make_mediator(channels_yaml(f"http://127.0.0.1:{unused_tcp_port}/api/api_fhir_r4/"))
    response = await client.get("/fhir/Medication/")
    assert response.status == 502
    assert (await response.json())["issue"][0]["code"] == "transient"


async def test_slow_upstream_is_504(aiohttp_server, make_mediator):
    async def login(request):
        return web.json_response({"token": "t", "exp": int(time.time()) + 3600})

    async def slow(request):
        await asyncio.sleep(5)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/api/api_fhir_r4/login/", login)
    app.router.add_get("/api/api_fhir_r4/{tail:.*}", slow)
    server = await aiohttp_server(app)
    channels = """\
      - name: claims
        path: ^/fhir/Claim(/[^/]+)?/?$
        methods: [GET]
        upstream: openimis
        timeout_s: 0.3
        ip_allowlist: [local]
        authentication: none
    """
    client = await make_mediator(channels_yaml(upstream_url(server), channels=channels))
    started = time.monotonic()
    response = await client.get("/fhir/Claim/")
    assert response.status == 504
    assert time.monotonic() - started < 3
    assert (await response.json())["issue"][0]["code"] == "timeout"


async def test_location_header_and_unknown_response_headers(aiohttp_server, make_mediator):
    async def login(request):
        return web.json_response({"token": "t", "exp": int(time.time()) + 3600})

    async def create(request):
        return web.json_response({"resourceType": "Claim", "id": "c1"}, status=201, headers={
            "Location": f"http://{request.host}/api/api_fhir_r4/Claim/c1/", "Set-Cookie": "csrftoken=x",
            "X-Frame-Options": "DENY", "ETag": 'W/"1"'})

    app = web.Application()
    app.router.add_post("/api/api_fhir_r4/login/", login)
    app.router.add_post("/api/api_fhir_r4/Claim/", create)
    server = await aiohttp_server(app)
    client = await make_mediator(channels_yaml(upstream_url(server)))
    response = await client.post("/fhir/Claim", json={"resourceType": "Claim"})
    assert response.status == 201
    assert response.headers["Location"] == "https://mediator.example.org/fhir/Claim/c1/"
    assert response.headers["ETag"] == 'W/"1"'
    assert "Set-Cookie" not in response.headers


def _internal_error_server(status: int, text: str):  # type: ignore[no-untyped-def]
    """An openIMIS that answers every FHIR request with `status` and an OperationOutcome saying `text`."""
    app = web.Application()

    async def login(request):  # type: ignore[no-untyped-def]
        return web.json_response({"token": "t0ken-of-the-mediator", "exp": time.time() + 3600})

    async def fail(request):  # type: ignore[no-untyped-def]
        return web.json_response({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "exception", "details": {"text": text}}]}, status=status,
            headers={"Retry-After": "7", "X-Powered-By": "Django"})

    app.router.add_post("/api/api_fhir_r4/login/", login)
    app.router.add_route("*", "/{tail:.*}", fail)
    return app


async def test_openimis_errors_are_passed_on_generic_and_kept_whole_in_the_log(aiohttp_server, make_mediator,
                                                                               caplog):
    for status, reason, answered in ((500, "upstream.error", 500), (400, "upstream.refused", 400),
                                     (404, "upstream.refused", 404),
                                     (401, "upstream.refused", 502)):  # openIMIS refused *our* login
        server = await aiohttp_server(_internal_error_server(
            status, "[\"Claim with code 'FOREIGN-42' already exists.\"] at http://openimis.internal:8000/api/api_fhir_r4/"))
        upstream = upstream_url(server)
        mediator = await make_mediator(channels_yaml(upstream))
        caplog.clear()
        with caplog.at_level("INFO", logger="mediator.upstream"):
            response = await mediator.post("/fhir/Claim", json={"resourceType": "Claim"})
        text = await response.text()
        assert response.status == answered
        assert response.content_type == "application/fhir+json"
        outcome = json.loads(text)
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["details"]["coding"][0]["code"] == reason
        for internal in ("FOREIGN-42", "already exists", str(server.port), "openimis.internal", "8000", "api_fhir_r4",
                         "Django"):
            assert internal not in text and internal not in str(response.headers)
        assert response.headers["Retry-After"] == "7"          # allowlisted headers still pass
        errors = [r.msg.fields for r in caplog.records
                  if isinstance(r.msg, JsonEvent) and r.msg.fields["event"] == "upstream.error"]
        assert [(e["upstream"], e["status"]) for e in errors] == [("openimis", status)]
        assert "Claim with code 'FOREIGN-42' already exists." in errors[0]["body"]   # openIMIS's words, for operators
        assert "t0ken-of-the-mediator" not in " ".join(r.getMessage() for r in caplog.records)


async def test_no_answer_names_the_server_software(mediator, tmp_path, sandbox_server, aiohttp_client):
    from mediator.config import load_config
    from mediator.server import mediator_sites
    from tests.conftest import write_config

    answers = [await mediator.get("/fhir/Medication/"), await mediator.get("/fhir/Nothing/"),
               await mediator.get("/healthz"), await mediator.post("/auth/token"),
               await mediator.get("/.well-known/jwks.json")]
    root = write_config(tmp_path / "ops", channels_yaml(upstream_url(sandbox_server),
                                                       extra_server="metrics:\n  host: 127.0.0.1\n  port: 0\n"))
    ops = await aiohttp_client(mediator_sites(load_config(root))[1].app)
    answers += [await ops.get("/metrics"), await ops.get("/readyz"), await ops.get("/nothing")]
    assert {a.status for a in answers} >= {200, 404}
    for answer in answers:
        assert "Server" not in answer.headers, (answer.url, answer.headers.get("Server"))


# --- the one openIMIS client API: re-login rule, parsed documents, one page iterator --------------------------

def _client(server):
    from mediator.config.models import UpstreamConfig
    from mediator.upstream import OpenImisUpstream

    config = UpstreamConfig.model_validate({"base_url": upstream_url(server),
                                            "login": {"username": "Admin", "password_env": "OPENIMIS_PASSWORD"}})
    return OpenImisUpstream("openimis", config, "https://mediator.example.org/fhir/",
                            environ={"OPENIMIS_PASSWORD": "admin123"})


async def test_get_document_logs_in_again_once_on_a_401(sandbox, sandbox_server):
    upstream = _client(sandbox_server)
    await upstream.start()
    try:
        status, document = await upstream.get_document("Medication", "_count=1", 5, "t-1")
        assert status == 200 and document["resourceType"] == "Bundle" and sandbox.logins == 1
        sandbox.tokens.clear()   # openIMIS restarted: the token is refused once, then a fresh login
        status, _ = await upstream.get_document("Medication", "_count=1", 5, "t-2")
        assert status == 200 and sandbox.logins == 2
    finally:
        await upstream.close()


async def test_pages_reads_every_page_by_offset_and_stops_at_the_last(sandbox, sandbox_server):
    upstream = _client(sandbox_server)
    await upstream.start()
    try:
        total = len(sandbox.store["Practitioner"])
        pages = [page async for page in upstream.pages("Practitioner", {}, 1, 5, "t-3", max_pages=total + 5)]
        assert [p.number for p in pages] == list(range(1, total + 1)) and not pages[-1].has_next
        assert sum(len(p.resources("Practitioner")) for p in pages) == total
        queries = [r["query"] for r in sandbox.requests if "/Practitioner/" in r["path"]]
        assert queries[:2] == ["_count=1&page-offset=1", "_count=1&page-offset=2"]   # never openIMIS's next URL
        assert total == 3
        with pytest.raises(UpstreamInvalidAnswer, match="more than 1 pages"):
            _ = [page async for page in upstream.pages("Practitioner", {}, 1, 5, "t-4", max_pages=1)]
    finally:
        await upstream.close()


async def test_a_forwarded_answer_carries_its_document_parsed_once(sandbox, sandbox_server):
    from mediator.request_view import RequestView
    from mediator.upstream import ParsedResponse, response_document

    upstream = _client(sandbox_server)
    await upstream.start()
    try:
        response = await upstream.forward(RequestView.described("GET", "/fhir/Practitioner/"), "Practitioner", None,
                                          "127.0.0.1", "t-5", 5)
        assert isinstance(response, ParsedResponse) and response.status == 200
        # The document is the body, not a second parse of something else; its links are still openIMIS's
        # (the link_rewrite response step rewrites them in this same document: tests/test_link_rewrite.py).
        assert response.document == json.loads(response.body) and response_document(response) is response.document
        assert all(link["url"].startswith(upstream_url(sandbox_server)) for link in response.document["link"])
    finally:
        await upstream.close()
