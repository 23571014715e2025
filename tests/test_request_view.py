"""The request view: built once by the adapter; the chain needs no aiohttp request (nor a fake of one)."""

import ast
from pathlib import Path

from aiohttp import web

from mediator.request_view import RequestView

MEDIATOR = Path(__file__).resolve().parents[1] / "mediator"


def test_a_described_request_reads_like_a_received_one():
    headers = {"Content-Type": "Application/FHIR+json; charset=utf-8", "Content-Length": "12"}
    view = RequestView.described("post", "/fhir/Claim/?a=1&a=2&b=%20x", headers, "192.0.2.9")
    assert (view.method, view.path, view.raw_path) == ("POST", "/fhir/Claim/", "/fhir/Claim/?a=1&a=2&b=%20x")
    assert view.raw_query_string == "a=1&a=2&b=%20x" and view.query.getall("a") == ["1", "2"]
    assert view.query["b"] == " x" and view.remote == "192.0.2.9"
    assert (view.content_type, view.content_length) == ("application/fhir+json", 12)
    assert view.peer_certificate is None and view.body is None
    assert RequestView.described("GET", "/fhir/metadata").content_type == "application/octet-stream"


async def test_the_http_adapter_builds_the_same_view(aiohttp_client):
    seen: list[RequestView] = []

    async def handler(request: web.Request) -> web.Response:
        view = RequestView.from_aiohttp(request)
        seen.append(view)
        body = b"".join([chunk async for chunk in view.body]) if view.body is not None else b""
        return web.Response(body=body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    client = await aiohttp_client(app)
    response = await client.post("/fhir/Claim/?a=1&a=2&b=%20x", data=b'{"a":1}',
                                 headers={"Content-Type": "Application/FHIR+json; charset=utf-8"})
    assert await response.read() == b'{"a":1}'
    live = seen[0]
    described = RequestView.described("POST", "/fhir/Claim/?a=1&a=2&b=%20x",
                                      {"Content-Type": "application/fhir+json", "Content-Length": "7"}, live.remote)
    for name in ("method", "path", "raw_path", "raw_query_string", "content_type", "content_length", "remote"):
        assert getattr(live, name) == getattr(described, name), name
    assert list(live.query.items()) == list(described.query.items())


def test_no_runtime_module_imports_aiohttp_test_utils():
    offenders = []
    for path in MEDIATOR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.startswith("aiohttp.test_utils") or n == "aiohttp.pytest_plugin" for n in names):
                offenders.append(str(path.relative_to(MEDIATOR)))
    assert offenders == []
