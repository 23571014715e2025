"""HTTP/1.1 over a bare socket, for tests that must send bytes no client library would send (or would
normalise: dot segments, encodings, duplicate or folded headers, bare LF) and read answers as they are."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    raw_head: bytes = b""
    extra: bytes = field(default=b"")
    """Whatever the server sent after this response on the same connection (a second response here
    means it parsed a second request out of what we sent as one)."""

    def json(self) -> Any:
        return json.loads(self.body)


class ConnectionClosed(Exception):
    """The server closed the connection without answering."""


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise ConnectionClosed() from exc
        raise
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
            if size == 0:
                break
        body = b"".join(chunks)
    else:
        body = await reader.read()
    return RawResponse(status, headers, body, head)


async def exchange(host: str, port: int, data: bytes | list[bytes], *, pause_s: float = 0.0,
                   timeout_s: float = 10.0, linger_s: float = 0.0) -> RawResponse:
    """Send `data` (pieces separated by `pause_s`), read one response, then whatever else arrives
    within `linger_s` (if given) into `.extra`. `timeout_s` only guards the test from hanging forever."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        pieces = data if isinstance(data, list) else [data]
        for index, piece in enumerate(pieces):
            if index and pause_s:
                await asyncio.sleep(pause_s)
            writer.write(piece)
            try:
                await writer.drain()
            except ConnectionError:
                break
        response = await asyncio.wait_for(read_response(reader), timeout_s)
        if linger_s:
            try:
                response.extra = await asyncio.wait_for(reader.read(65536), linger_s)
            except (TimeoutError, ConnectionError):
                pass
        return response
    finally:
        writer.close()


def request(method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b"",
            host: str = "mediator.test") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k in (headers or {})):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
