"""A thin HTTP/1.1 client for one origin (openIMIS): a bounded keep-alive pool of asyncio protocols with
llhttp's C parser (`httptools`).

Why not aiohttp's client: on the data path it cost about as much CPU per request as the whole security
pipeline (README "Benchmarks", issue 18). This client does only what forwarding to openIMIS needs: one
request at a time per connection, whole bodies both ways, no redirects, no cookies, no proxies.

Contract (tested over real sockets in tests/test_upstream_client.py):
* at most `pool_size` connections (idle + busy + connecting); a request that finds them all busy waits;
* `connect_timeout_s` bounds the TCP (and TLS) connect, the request's `timeout_s` bounds everything
  (waiting for a connection included): `TimeoutError`;
* answers framed by Content-Length, chunked, or (no length) read to the end of the connection; a body
  above `max_body` is refused while it is read (`AnswerTooLarge`); a body cut short (the connection closed
  or reset before its end) is `ConnectionBroken`, never a shorter body;
* a connection is reused only after a complete answer that allows it (HTTP/1.1 without `Connection:
  close`); a pooled connection the server closed while idle is dropped before reuse;
* SECURITY: a request whose reused connection died before any byte of the answer is sent once more, on a
  fresh connection, only when it is a GET or HEAD. A POST/PUT/PATCH/DELETE may have reached openIMIS and
  been applied, so it is never repeated here: it fails (`ConnectionBroken`);
* `ConnectFailed`: the connection could not be opened, so nothing was sent (callers may release an
  idempotency key on it);
* headers are sent as given, plus `Host` and `Content-Length`: nothing else (no `Accept-Encoding`, so
  openIMIS answers identity; a gzip or deflate answer is decoded anyway, within `max_body`). A CR, LF or
  NUL in a header name or value, or a name that is not an RFC 9110 token, is refused (`ValueError`);
* TLS for an https origin with certificate and host name checks (`ssl.create_default_context()` unless a
  context is given), as aiohttp does by default.

Lifetime: created and closed on the event loop that uses it; `close()` closes every connection.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import cast

import httptools
from aiohttp.helpers import parse_content_type
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

__all__ = ["AnswerTooLarge", "ClientError", "ConnectFailed", "ConnectionBroken", "Reply", "UpstreamClient"]

IDEMPOTENT_RETRY = frozenset({"GET", "HEAD"})
"""The methods sent again once when a reused connection died before the answer began (see module doc)."""

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")   # RFC 9110 §5.6.2
_FORBIDDEN_IN_VALUES = re.compile(r"[\r\n\x00]")
_FORBIDDEN_IN_TARGET = re.compile(r"[\x00-\x20\x7f]")
_NO_BODY_STATUSES = frozenset({204, 304})


class ClientError(Exception):
    """Any failure to get a complete answer (other than a timeout, which is TimeoutError)."""


class ConnectFailed(ClientError):
    """The connection could not be opened: the request was not sent."""


class ConnectionBroken(ClientError):
    """The connection failed during the exchange (closed, reset, unparseable answer): the request may
    have been received."""


class AnswerTooLarge(ClientError):
    """The answer's body is larger than the client's limit."""

    def __init__(self) -> None:
        super().__init__("upstream answer too large")


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    content_type: str
    """The media type without parameters, lowercased; `application/octet-stream` without a Content-Type
    (RFC 9110 §8.3, as aiohttp computes it)."""


@lru_cache(maxsize=256)
def _media_type(raw: str | None) -> str:
    return "application/octet-stream" if raw is None else parse_content_type(raw)[0]


@lru_cache(maxsize=1024)
def _valid_name(name: str) -> bool:
    return _TOKEN.fullmatch(name) is not None


class _Exchange:
    """One request's answer as it arrives."""

    __slots__ = ("body_size", "chunks", "complete", "content_length", "done", "encoding", "head", "headers",
                 "received", "reusable", "status", "trailing", "until_eof")

    def __init__(self, done: asyncio.Future[None], head: bool) -> None:
        self.done = done
        self.head = head
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.body_size = 0
        self.received = False
        self.content_length: int | None = None
        self.encoding: str | None = None
        self.until_eof = False
        self.status = 0
        self.complete = False
        """The whole answer was parsed (resolved once the bytes that carried it are all parsed)."""
        self.reusable = False
        self.trailing = False
        """Bytes after the answer in the same read: its framing is wrong (a short Content-Length)."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one exchange at a time; idle between them, in the pool."""

    def __init__(self, client: UpstreamClient) -> None:
        self._client = client
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self._exchange: _Exchange | None = None
        self.closed = False
        self.reusable = False
        self.used = False
        self.idle_since = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses (no isinstance check); both write/abort.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None or exchange.done.done():
            # Bytes while idle (or after the answer): the connection is out of step; never reuse it.
            self._abort()
            return
        exchange.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ConnectionBroken("upstream switched protocols"))
            return
        except httptools.HttpParserError as exc:
            self._fail(ConnectionBroken("bytes after the answer" if exchange.complete
                                        else f"unparseable answer: {exc}"))
            return
        if exchange.trailing:
            self._fail(ConnectionBroken("bytes after the answer"))
        elif exchange.complete and not exchange.done.done():
            self.reusable = exchange.reusable
            exchange.done.set_result(None)

    def eof_received(self) -> bool | None:
        return None   # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        exchange = self._exchange
        if exchange is not None and not exchange.done.done():
            if exchange.until_eof and exc is None:
                exchange.done.set_result(None)   # an answer without length ends with the connection
            elif not exchange.received:
                exchange.done.set_exception(_DiedBeforeAnswer())
            else:
                exchange.done.set_exception(ConnectionBroken("connection closed before the answer's end"))
        self._client._lost(self)

    # httptools callbacks
    def on_message_begin(self) -> None:
        exchange = self._exchange
        if exchange is not None and exchange.complete:
            exchange.trailing = True

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self._exchange
        assert exchange is not None
        key = name.decode("utf-8", "surrogateescape")
        text = value.decode("utf-8", "surrogateescape")
        exchange.headers.append((key, text))
        if len(name) == 14 and key.lower() == "content-length":
            try:
                exchange.content_length = int(text)
            except ValueError:
                pass   # llhttp refuses it
        elif len(name) == 16 and key.lower() == "content-encoding":
            exchange.encoding = text.strip().lower()

    def on_headers_complete(self) -> None:
        exchange = self._exchange
        assert exchange is not None
        status = exchange.status = self._parser.get_status_code()
        if 100 <= status < 200:
            return
        if exchange.content_length is not None and exchange.content_length > self._client.max_body:
            self._fail(AnswerTooLarge())
            return
        if exchange.head:
            # llhttp does not know the request was a HEAD and would wait for a body: the answer is
            # complete here, and the connection is not reused (its framing is no longer certain).
            self._finish(reusable=False)
            return
        chunked = any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in exchange.headers)
        exchange.until_eof = (exchange.content_length is None and not chunked
                              and status not in _NO_BODY_STATUSES)

    def on_body(self, body: bytes) -> None:
        exchange = self._exchange
        assert exchange is not None
        if exchange.complete:   # a body after a HEAD answer
            exchange.trailing = True
            return
        if exchange.done.done():
            return
        exchange.body_size += len(body)
        if exchange.body_size > self._client.max_body:
            self._fail(AnswerTooLarge())
            return
        exchange.chunks.append(body)

    def on_message_complete(self) -> None:
        exchange = self._exchange
        assert exchange is not None
        if exchange.done.done() or exchange.complete:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            exchange.headers = []   # an interim answer (100 Continue): the real one follows
            exchange.content_length = None
            exchange.encoding = None
            return
        self._finish(reusable=self._parser.should_keep_alive() and not exchange.until_eof)

    # the client's side
    def _finish(self, reusable: bool) -> None:
        assert self._exchange is not None
        self._exchange.complete = True
        self._exchange.reusable = reusable

    def _fail(self, exc: Exception) -> None:
        assert self._exchange is not None
        if not self._exchange.done.done():
            self._exchange.done.set_exception(exc)
        self._abort()

    def _abort(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()

    async def exchange(self, request: bytes, head: bool) -> _Exchange:
        assert self.transport is not None
        self.used = True
        self.reusable = False
        exchange = self._exchange = _Exchange(asyncio.get_running_loop().create_future(), head)
        self.transport.write(request)
        try:
            await exchange.done
        finally:
            if not exchange.done.done() or exchange.done.cancelled():
                self._abort()   # cancelled or timed out mid-exchange: its answer may still come
        return exchange


class _DiedBeforeAnswer(ConnectionBroken):
    def __init__(self) -> None:
        super().__init__("connection closed before any byte of the answer")


class UpstreamClient:
    """A keep-alive pool of HTTP/1.1 connections to one origin (`base_url`'s scheme, host and port)."""

    def __init__(self, base_url: str, *, pool_size: int, connect_timeout_s: float, max_body: int,
                 ssl_context: ssl.SSLContext | None = None, keepalive_s: float = 30.0) -> None:
        base = URL(base_url)
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"not an http(s) URL: {base_url}")
        self.scheme = base.scheme
        self.host = base.host
        self.port = base.port or (443 if base.scheme == "https" else 80)
        self._origin = (self.scheme, self.host, self.port)
        default_port = self.port == (443 if base.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self._ssl = (ssl_context or ssl.create_default_context()) if base.scheme == "https" else None
        self.pool_size = pool_size
        self.connect_timeout_s = connect_timeout_s
        self.max_body = max_body
        self.keepalive_s = keepalive_s
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._opening = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Connections open or being opened (idle + busy + connecting); never above `pool_size`."""
        return len(self._idle) + len(self._busy) + self._opening

    async def request(self, method: str, url: URL, headers: Mapping[str, str], body: bytes | None,
                      timeout_s: float) -> Reply:
        """One request, its whole answer. Raises TimeoutError after `timeout_s`, ClientError otherwise."""
        if (url.scheme, url.host, url.port) != self._origin:
            raise ValueError(f"{url.scheme}://{url.host}:{url.port} is not this client's origin")
        request = self._serialise(method, url.raw_path_qs, headers, body)
        head = method == "HEAD"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with asyncio.timeout_at(deadline):
            for attempt in (0, 1):
                try:
                    connection = await self._acquire(fresh=attempt == 1)
                except ConnectFailed as exc:
                    if attempt == 1:   # the first attempt may have reached the server: not "nothing sent"
                        raise ConnectionBroken("reconnect failed after the connection closed") from exc
                    raise
                reused = connection.used
                try:
                    exchange = await connection.exchange(request, head)
                except _DiedBeforeAnswer:
                    if reused and attempt == 0 and method in IDEMPOTENT_RETRY:
                        continue
                    raise
                finally:
                    self._release(connection)
                return self._reply(exchange)
        raise AssertionError("unreachable")

    def _serialise(self, method: str, target: str, headers: Mapping[str, str], body: bytes | None) -> bytes:
        if _TOKEN.fullmatch(method) is None or _FORBIDDEN_IN_TARGET.search(target):
            raise ValueError("invalid request line")
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}"]
        for name, value in headers.items():
            if not _valid_name(name):
                raise ValueError(f"invalid header name {name!r}")
            lines.append(f"{name}: {value}")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        elif method in ("POST", "PUT", "PATCH"):
            lines.append("Content-Length: 0")
        # One scan for every value (names are tokens, the request line is checked above).
        if _FORBIDDEN_IN_VALUES.search("".join(headers.values())):
            raise ValueError("CR, LF or NUL in a header value")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
        return data + body if body else data

    def _reply(self, exchange: _Exchange) -> Reply:
        body = b"".join(exchange.chunks)
        if exchange.encoding and exchange.encoding != "identity" and body:
            body = self._decode(body, exchange.encoding)
        headers = CIMultiDictProxy(CIMultiDict(exchange.headers))
        return Reply(exchange.status, headers, body, _media_type(headers.get("Content-Type")))

    def _decode(self, body: bytes, encoding: str) -> bytes:
        if encoding in ("gzip", "x-gzip"):
            decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            decoder = zlib.decompressobj(wbits=zlib.MAX_WBITS if body[:1] == b"\x78" else -zlib.MAX_WBITS)
        else:
            raise ConnectionBroken(f"unsupported content-encoding {encoding!r}")
        try:
            decoded = decoder.decompress(body, self.max_body + 1)
        except zlib.error as exc:
            raise ConnectionBroken("undecodable compressed answer") from exc
        if len(decoded) > self.max_body:
            raise AnswerTooLarge()
        if not decoder.eof:
            raise ConnectionBroken("truncated compressed answer")
        return decoded

    async def _acquire(self, fresh: bool) -> _Connection:
        while True:
            if self._closed:
                raise ClientError("client closed")
            if not fresh:
                now = time.monotonic()
                while self._idle:
                    connection = self._idle.pop()
                    if connection.closed or connection.transport is None or connection.transport.is_closing():
                        continue
                    if now - connection.idle_since > self.keepalive_s:
                        connection._abort()
                        continue
                    self._busy.add(connection)
                    return connection
            elif self._idle and self.open_connections >= self.pool_size:
                self._idle.pop(0)._abort()   # make room for the fresh connection
            if self.open_connections < self.pool_size:
                return await self._connect()
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()   # pass on the wake-up this waiter got but will not use
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise

    async def _connect(self) -> _Connection:
        self._opening += 1
        try:
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    _, connection = await loop.create_connection(
                        lambda: _Connection(self), self.host, self.port, ssl=self._ssl,
                        server_hostname=self.host if self._ssl else None)
            except TimeoutError as exc:
                raise ConnectFailed("connect timed out") from exc
            except OSError as exc:   # refused, unreachable, DNS, TLS verification (ssl.SSLError)
                raise ConnectFailed(f"cannot connect: {type(exc).__name__}") from exc
        except BaseException:
            self._wake()   # the slot it held is free again
            raise
        finally:
            self._opening -= 1
        if self._closed:
            connection._abort()
            raise ClientError("client closed")
        self._busy.add(connection)
        return connection

    def _release(self, connection: _Connection) -> None:
        self._busy.discard(connection)
        connection._exchange = None
        if connection.reusable and not connection.closed and not self._closed:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection._abort()
        self._wake()

    def _lost(self, connection: _Connection) -> None:
        if connection in self._idle:
            self._idle.remove(connection)
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        """Close every connection (idle and busy); requests waiting for one fail."""
        self._closed = True
        for connection in [*self._idle, *self._busy]:
            connection._abort()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ClientError("client closed"))
        await asyncio.sleep(0)   # let the transports run connection_lost
