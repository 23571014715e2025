"""mediator/upstream_client.py over real sockets: a scripted raw HTTP server answers each request as the
test says and records what arrived (bytes as sent, connections opened)."""

from __future__ import annotations

import asyncio
import gzip
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from yarl import URL

from mediator.certs import make_dev_pki
from mediator.upstream_client import AnswerTooLarge, ClientError, ConnectFailed, ConnectionBroken, UpstreamClient


@dataclass
class Received:
    connection: int
    method: str
    target: str
    head: bytes
    body: bytes


Respond = Callable[[Received, asyncio.StreamWriter], Awaitable[None]]


def answer(body: bytes = b"{}", status: str = "200 OK", headers: str = "Content-Type: application/json\r\n",
           length: int | None = None) -> bytes:
    return (f"HTTP/1.1 {status}\r\n{headers}Content-Length: {len(body) if length is None else length}\r\n\r\n"
            .encode() + body)


async def ok(request: Received, writer: asyncio.StreamWriter) -> None:
    writer.write(answer(b'{"ok":true}'))


@dataclass
class Scripted:
    respond: Respond = ok
    requests: list[Received] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    eofs: int = 0
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.eofs += 1
                    return
                method, target = head.split(b" ")[:2]
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                received = Received(number, method.decode(), target.decode(), head, await reader.readexactly(length))
                self.requests.append(received)
                await self.respond(received, writer)
                if writer.is_closing():
                    return
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.open_now -= 1
            writer.close()

    def url(self, path: str = "Medication/", scheme: str = "http") -> URL:
        return URL(f"{scheme}://127.0.0.1:{self.port}/api/api_fhir_r4/{path}", encoded=True)


@pytest.fixture
async def server() -> AsyncIterator[Scripted]:
    scripted = Scripted()
    listening = await asyncio.start_server(scripted.handle, "127.0.0.1", 0)
    scripted.port = listening.sockets[0].getsockname()[1]
    yield scripted
    listening.close()


@pytest.fixture
async def client(server: Scripted) -> AsyncIterator[UpstreamClient]:
    made = UpstreamClient(str(server.url("")), pool_size=4, connect_timeout_s=2, max_body=1000)
    yield made
    await made.close()


async def test_sends_the_headers_as_given_with_host_and_reuses_the_connection(server, client):
    headers = {"Accept": "application/json", "X-Request-ID": "r1", "Authorization": "Bearer t"}
    first = await client.request("GET", server.url("Medication/?_count=1"), headers, None, 5)
    second = await client.request("POST", server.url("Claim/"), {"Content-Type": "application/json"}, b'{"a":1}', 5)
    assert (first.status, first.body, second.status) == (200, b'{"ok":true}', 200)
    assert server.connections == 1
    get, post = server.requests
    assert get.head == (f"GET /api/api_fhir_r4/Medication/?_count=1 HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                        "Accept: application/json\r\nX-Request-ID: r1\r\nAuthorization: Bearer t\r\n\r\n").encode()
    assert b"Accept-Encoding" not in post.head and b"User-Agent" not in post.head
    assert b"Content-Length: 7\r\n" in post.head and post.body == b'{"a":1}'


async def test_a_body_less_post_says_content_length_0(server, client):
    await client.request("POST", server.url(), {}, None, 5)
    assert b"Content-Length: 0\r\n" in server.requests[0].head


async def test_answer_headers_are_a_case_insensitive_multidict_and_the_media_type_is_aiohttps(server, client):
    async def respond(request: Received, writer: asyncio.StreamWriter) -> None:
        writer.write(answer(headers="Content-Type: Application/FHIR+JSON; charset=UTF-8\r\n"
                            "Location: http://x/Claim/1\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"))
    server.respond = respond
    reply = await client.request("GET", server.url(), {}, None, 5)
    assert reply.headers.get("location") == "http://x/Claim/1"
    assert reply.headers.getall("SET-COOKIE") == ["a=1", "b=2"]
    assert reply.content_type == "application/fhir+json"


async def test_an_answer_without_content_type_is_octet_stream(server, client):
    async def respond(request: Received, writer: asyncio.StreamWriter) -> None:
        writer.write(answer(headers=""))
    server.respond = respond
    assert (await client.request("GET", server.url(), {}, None, 5)).content_type == "application/octet-stream"


async def test_chunked_answers_are_read_whole(server, client):
    async def respond(request: Received, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"2\r\n1}\r\n0\r\n\r\n")
    server.respond = respond
    assert (await client.request("GET", server.url(), {}, None, 5)).body == b'{"a":1}'
    assert (await client.request("GET", server.url(), {}, None, 5)).body == b'{"a":1}'
    assert server.connections == 1


async def test_an_answer_without_length_is_read_to_the_end_and_its_connection_is_not_reused(server, client):
    async def respond(request: Received, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"a\":")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"1}")
        writer.close()
    server.respond = respond
    assert (await client.request("GET", server.url(), {}, None, 5)).body == b'{"a":1}'
    assert (await client.request("GET", server.url(), {}, None, 5)).body == b'{"a":1}'
    assert server.connections == 2


@pytest.mark.parametrize("status_line, extra", [("HTTP/1.1 200 OK", "Connection: close\r\n"),
                                                ("HTTP/1.0 200 OK", "")])
async def test_connection_close_and_http_1_0_answers_are_not_reused(server, client, status_line, extra):
    async def respond(request: Received, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{status_line}\r\n{extra}Content-Length: 2\r\n\r\n{{}}".encode())
    server.respond = respond
    for _ in range(2):
        assert (await client.request("GET", server.url(), {}, None, 5)).body == b"{}"
    assert server.connections == 2


async def test_a_gzip_answer_is_decoded(server, client):
    async def respond(request: Received, writer: asyncio.StreamWriter) -> None:
        writer.write(answer(gzip.compress(b'{"a":1}'), headers="Content-Encoding: gzip\r\n"))
    server.respond = respond
    assert (await client.request("GET", server.url(), {}, None, 5)).body == b'{"a":1}'


@pytest.mark.parametrize("framing", ["content-length", "chunked", "until-eof", "gzip"])
async def test_an_answer_above_the_limit_is_refused_while_it_is_read(server, client, framing):
    big = b"x" * 1001

    async def respond(request: Received, writer: asyncio.StreamWriter) -> None:
        if framing == "content-length":
            writer.write(answer(big))
        elif framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(3):
                writer.write(b"190\r\n" + b"x" * 400 + b"\r\n")   # 3 × 400 bytes, no final chunk needed
        elif framing == "until-eof":
            writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + big)
        else:
            writer.write(answer(gzip.compress(b"x" * 100_000), headers="Content-Encoding: gzip\r\n"))
    server.respond = respond
    with pytest.raises(AnswerTooLarge, match="upstream answer too large"):
        await client.request("GET", server.url(), {}, None, 5)


async def _truncated(writer: asyncio.StreamWriter) -> None:
    writer.write(answer(b'{"a":', length=20))
    await writer.drain()
    writer.close()


async def _reset(writer: asyncio.StreamWriter) -> None:
    writer.write(answer(b'{"a":', length=20))
    await writer.drain()
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _chunked_cut(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n")
    await writer.drain()
    writer.close()


async def _short_length(writer: asyncio.StreamWriter) -> None:
    writer.write(answer(b'{"a":1}', length=3))   # the rest is junk after the answer


async def _garbage(writer: asyncio.StreamWriter) -> None:
    writer.write(b"<html>not http</html>\r\n\r\n")


@pytest.mark.parametrize("behaviour", [_truncated, _reset, _chunked_cut, _short_length, _garbage],
                         ids=lambda f: f.__name__.strip("_"))
async def test_a_cut_or_malformed_answer_is_an_error_never_a_shorter_body(server, client, behaviour):
    async def respond(request: Received, writer: asyncio.StreamWriter) -> None:
        await behaviour(writer)
    server.respond = respond
    with pytest.raises(ConnectionBroken):
        await client.request("GET", server.url(), {}, None, 5)
    server.respond = ok
    assert (await client.request("GET", server.url(), {}, None, 5)).status == 200   # a fresh connection


async def test_a_pooled_connection_the_server_closed_while_idle_is_not_reused(server, client):
    async def respond(request: Received, writer: asyncio.StreamWriter) -> None:
        await ok(request, writer)
        await writer.drain()
        writer.close()   # no Connection: close header: the client learns it from the socket
    server.respond = respond
    await client.request("GET", server.url(), {}, None, 5)
    await asyncio.sleep(0.05)
    server.respond = ok
    reply = await client.request("POST", server.url(), {}, b"{}", 5)
    assert reply.status == 200 and [r.method for r in server.requests] == ["GET", "POST"]
    assert server.connections == 2


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_get_on_a_reused_connection_that_died_before_the_answer_is_sent_again_once(server, client, method):
    async def respond(request: Received, writer: asyncio.StreamWriter) -> None:
        if [r.connection for r in server.requests].count(request.connection) == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + (b"" if request.method == "HEAD" else b"{}"))
        else:
            writer.close()
    server.respond = respond
    await client.request("GET", server.url(), {}, None, 5)
    reply = await client.request(method, server.url(), {}, None, 5)
    assert reply.status == 200 and reply.body == (b"" if method == "HEAD" else b"{}")
    assert [(r.connection, r.method) for r in server.requests] == [(1, "GET"), (1, method), (2, method)]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_a_write_on_a_connection_that_died_before_the_answer_is_never_sent_again(server, client, method):
    async def respond(request: Received, writer: asyncio.StreamWriter) -> None:
        if [r.connection for r in server.requests].count(request.connection) == 1:
            writer.write(answer())
        else:
            writer.close()
    server.respond = respond
    await client.request("GET", server.url(), {}, None, 5)
    with pytest.raises(ConnectionBroken) as raised:
        await client.request(method, server.url(), {}, b"{}", 5)
    assert not isinstance(raised.value, ConnectFailed)   # it may have been received: not "nothing sent"
    assert [r.method for r in server.requests] == ["GET", method]


async def test_the_pool_is_bounded_and_requests_wait_for_a_connection(server):
    async def respond(request: Received, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.05)
        await ok(request, writer)
    server.respond = respond
    client = UpstreamClient(str(server.url("")), pool_size=2, connect_timeout_s=2, max_body=1000)
    try:
        replies = await asyncio.gather(*(client.request("GET", server.url(), {}, None, 5) for _ in range(7)))
        assert [r.status for r in replies] == [200] * 7
        assert server.connections == 2 and server.most_open == 2 and client.open_connections == 2
    finally:
        await client.close()


async def test_the_timeout_covers_waiting_for_a_connection(server):
    async def respond(request: Received, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(1)
        await ok(request, writer)
    server.respond = respond
    client = UpstreamClient(str(server.url("")), pool_size=1, connect_timeout_s=2, max_body=1000)
    try:
        slow = asyncio.ensure_future(client.request("GET", server.url(), {}, None, 5))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            await client.request("GET", server.url(), {}, None, 0.1)
        assert (await slow).status == 200
    finally:
        await client.close()


async def test_an_answer_later_than_the_timeout_is_a_timeout_and_its_connection_is_dropped(server, client):
    async def respond(request: Received, writer: asyncio.StreamWriter) -> None:
        if len(server.requests) == 1:
            await asyncio.sleep(0.3)
        await ok(request, writer)
    server.respond = respond
    with pytest.raises(TimeoutError):
        await client.request("GET", server.url(), {}, None, 0.1)
    assert (await client.request("GET", server.url(), {}, None, 5)).body == b'{"ok":true}'
    assert server.connections == 2


async def test_a_refused_connection_is_connect_failed(unused_tcp_port):
    client = UpstreamClient(f"http://127.0.0.1:{unused_tcp_port}/", pool_size=2, connect_timeout_s=2, max_body=10)
    try:
        with pytest.raises(ConnectFailed):
            await client.request("GET", URL(f"http://127.0.0.1:{unused_tcp_port}/x"), {}, None, 5)
        assert client.open_connections == 0
    finally:
        await client.close()


async def test_the_connect_timeout_bounds_a_tls_handshake_that_never_ends(server):
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1000):   # reads the ClientHello, never answers it
            pass
        writer.close()
    listening = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    client = UpstreamClient(f"https://127.0.0.1:{port}/", pool_size=2, connect_timeout_s=0.2, max_body=10)
    try:
        with pytest.raises(ConnectFailed, match="timed out"):
            await client.request("GET", URL(f"https://127.0.0.1:{port}/x"), {}, None, 5)
    finally:
        await client.close()
        listening.close()
        await asyncio.sleep(0.05)


async def test_tls_checks_the_certificate_and_the_host_name(tmp_path):
    make_dev_pki(tmp_path, ())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    scripted = Scripted()
    listening = await asyncio.start_server(scripted.handle, "127.0.0.1", 0, ssl=context)
    port = listening.sockets[0].getsockname()[1]
    trusting = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    try:
        for host, trust, works in [("localhost", trusting, True), ("127.0.0.1", trusting, True),
                                   ("localhost", None, False)]:   # None: the system's CAs, as aiohttp
            client = UpstreamClient(f"https://{host}:{port}/", pool_size=1, connect_timeout_s=2, max_body=100,
                                    ssl_context=trust)
            try:
                if works:
                    assert (await client.request("GET", URL(f"https://{host}:{port}/x"), {}, None, 5)).status == 200
                else:
                    with pytest.raises(ConnectFailed, match="SSLCertVerificationError"):
                        await client.request("GET", URL(f"https://{host}:{port}/x"), {}, None, 5)
            finally:
                await client.close()
        assert scripted.requests[0].head.startswith(b"GET /x HTTP/1.1\r\nHost: localhost:")
    finally:
        listening.close()
        await asyncio.sleep(0.1)   # the server side of the refused handshake closes its socket


@pytest.mark.parametrize("headers", [{"X-A": "v\r\nX-Injected: 1"}, {"X-A": "v\nX"}, {"X-A": "v\x00"},
                                     {"X-A\r\nX-B": "v"}, {"X A": "v"}, {"X-A:": "v"}, {"": "v"}])
async def test_cr_lf_in_headers_are_refused_and_nothing_is_sent(server, client, headers):
    with pytest.raises(ValueError):
        await client.request("GET", server.url(), headers, None, 5)
    assert server.connections == 0


async def test_a_request_target_with_spaces_or_another_origin_is_refused(server, client):
    with pytest.raises(ValueError):
        await client.request("GET", URL(f"http://127.0.0.1:{server.port}/a b HTTP/1.1\r\nX: y", encoded=True),
                             {}, None, 5)
    with pytest.raises(ValueError):
        await client.request("GET", URL("http://elsewhere.example/x"), {}, None, 5)
    assert server.connections == 0


async def test_closing_closes_every_connection(server):
    client = UpstreamClient(str(server.url("")), pool_size=4, connect_timeout_s=2, max_body=1000)
    await asyncio.gather(*(client.request("GET", server.url(), {}, None, 5) for _ in range(3)))
    assert server.open_now == 3
    await client.close()
    await asyncio.sleep(0.05)
    assert server.open_now == 0 and client.open_connections == 0
    with pytest.raises(ClientError):
        await client.request("GET", server.url(), {}, None, 5)


def test_the_same_exchanges_work_on_uvloop():
    """`serve --event-loop uvloop`: uvloop's transports are not asyncio.Transport subclasses."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        scripted = Scripted()
        listening = await asyncio.start_server(scripted.handle, "127.0.0.1", 0)
        scripted.port = listening.sockets[0].getsockname()[1]
        client = UpstreamClient(str(scripted.url("")), pool_size=2, connect_timeout_s=2, max_body=1000)
        try:
            for _ in range(2):
                assert (await client.request("GET", scripted.url(), {}, None, 5)).body == b'{"ok":true}'
            assert scripted.connections == 1
        finally:
            await client.close()
            listening.close()
            await asyncio.sleep(0.05)

    uvloop.run(main())
