"""The request as the stages and steps see it: built once by the adapter that received it.

The HTTP handler builds it from the aiohttp request (`from_aiohttp`); offline evaluation (explain, the
policy tests) and table tests build it from a described request (`described`), so nothing of the
chain needs an aiohttp request or a fake of one. Names follow aiohttp's where they mean the same.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping
from yarl import URL

_READ_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class RequestView:
    method: str
    raw_path: str
    """The path as sent, with its query, before any decoding (what the channel stage checks)."""
    path: str
    """The decoded path, without the query."""
    raw_query_string: str
    """The query as sent (forwarded to openIMIS as is)."""
    query: MultiMapping[str]
    headers: CIMultiDictProxy[str]
    remote: str | None
    """The TCP peer's address (client_ip resolves X-Forwarded-For from it)."""
    content_type: str
    """The media type of Content-Type, lower case, without parameters (application/octet-stream if absent)."""
    content_length: int | None
    peer_certificate: bytes | None = None
    """The client's TLS certificate (DER) when it presented one (mTLS)."""
    body: AsyncIterator[bytes] | None = None
    """The body as it arrives (None: no body to read, or given to the Exchange already)."""

    @classmethod
    def from_aiohttp(cls, request: web.Request) -> RequestView:
        certificate = None
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            certificate = ssl_object.getpeercert(binary_form=True) or None
        return cls(request.method, request.raw_path, request.path, request.rel_url.raw_query_string,
                   request.query, request.headers, request.remote, request.content_type, request.content_length,
                   certificate,
                   request.content.iter_chunked(_READ_CHUNK) if request.can_read_body else None)

    @classmethod
    def described(cls, method: str, path_with_query: str, headers: Mapping[str, str] | None = None,
                  remote: str | None = "127.0.0.1") -> RequestView:
        """A request described by its method, path (with query) and headers; its body is given to the
        Exchange (`Exchange(view, id, _body=...)`)."""
        url = URL(path_with_query)
        given = CIMultiDictProxy(CIMultiDict(headers or {}))
        media_type = given.get("Content-Type", "").split(";", 1)[0].strip().lower() or "application/octet-stream"
        length = given.get("Content-Length", "")
        return cls(method.upper(), path_with_query, url.path, url.raw_query_string, url.query, given, remote,
                   media_type, int(length) if length.isdigit() else None)
