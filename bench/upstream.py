"""A fast openIMIS imitation for benchmarks: raw asyncio, keep-alive, no framework.

It answers `POST /api/api_fhir_r4/login/` with {"token","exp"} (as openIMIS does) and every other
request under `/api/api_fhir_r4/` with one fixed, small searchset Bundle whose links are absolute
upstream URLs (so the mediator's Bundle rewriting runs, as it does against real openIMIS). It is
meant to cost as little CPU as possible so the proxies in front of it are what is measured.

Usage: python bench/upstream.py --port 18000   (prints "ready" on stdout once listening)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time

BASE = b"/api/api_fhir_r4/"


def bundle_body(port: int) -> bytes:
    base = f"http://127.0.0.1:{port}/api/api_fhir_r4/"
    bundle = {
        "resourceType": "Bundle", "type": "searchset", "total": 2,
        "link": [{"relation": "self", "url": base + "Medication/"}],
        "entry": [
            {"fullUrl": base + f"Medication/{uid}",
             "resource": {"resourceType": "Medication", "id": uid,
                          "identifier": [{"type": {"coding": [{"code": "Code"}]}, "value": code}],
                          "code": {"text": text}, "status": "active"}}
            for uid, code, text in (
                ("4bd0d1d6-67b4-4c55-8b6d-3b4a3d6a0a01", "0001", "ACETYLSALICYLIC ACID (ASPIRIN) 300MG"),
                ("4bd0d1d6-67b4-4c55-8b6d-3b4a3d6a0a02", "0004", "AMINOPHYLLINE 100MG"),
            )
        ],
    }
    return json.dumps(bundle, separators=(",", ":")).encode()


def response(status: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\nConnection: keep-alive\r\n\r\n" + body)


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, bundle_reply: bytes) -> None:
        self.buffer = b""
        self.bundle_reply = bundle_reply
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        assert self.transport is not None
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                length = int(lower[at + 17: stop if stop >= 0 else len(lower)])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length:]
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0]
            if not path.startswith(BASE):
                self.transport.write(response(b"404 Not Found", b'{"detail":"not found"}'))
            elif method == b"POST" and path == BASE + b"login/":
                token = json.dumps({"token": "bench-token", "exp": int(time.time()) + 86400}).encode()
                self.transport.write(response(b"200 OK", token))
            else:
                self.transport.write(self.bundle_reply)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    reply = response(b"200 OK", bundle_body(port))
    server = await loop.create_server(lambda: UpstreamProtocol(reply), host, port, backlog=1024,
                                      reuse_port=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
