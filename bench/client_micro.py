"""The upstream client alone, in one process: CPU µs per request of aiohttp's ClientSession used as
mediator/upstream.py used it (a ClientTimeout, `iter_any`, the headers copied), of the thin client
(mediator/upstream_client.py), and a floor (a prebuilt request written on a kept connection, the answer
counted in bytes, no parsing): what any Python client pays for the socket and the event loop. Against
bench/upstream.py on loopback, 4 concurrent callers, rounds in shuffled order, process CPU time ÷ requests
(the upstream runs in its own process). README "Benchmarks": the thin upstream client.

Usage: .venv/bin/python bench/client_micro.py [--requests 2000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from yarl import URL

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import run as bench  # noqa: E402  (processes, ports)

from mediator.upstream_client import UpstreamClient  # noqa: E402

HEADERS = {"Accept": "application/json", "X-Forwarded-For": "127.0.0.1", "X-Forwarded-Host": "localhost:8443",
           "X-Forwarded-Proto": "https", "X-Request-ID": "0123456789abcdef0123456789abcdef",
           "Authorization": "Bearer " + "x" * 300}   # what the mediator sends, a token's length


class Floor(asyncio.Protocol):
    def __init__(self, answer_size: int) -> None:
        self.answer_size = answer_size
        self.received = 0
        self.done: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.received >= self.answer_size and self.done is not None:
            self.done.set_result(None)


async def measure(port: int, requests: int, rounds: int, callers: int) -> dict[str, list[float]]:
    base = f"http://127.0.0.1:{port}/api/api_fhir_r4/"
    url = URL(base + "Medication/", encoded=True)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32, keepalive_timeout=30),
                                    auto_decompress=True, cookie_jar=aiohttp.DummyCookieJar())
    timeout = aiohttp.ClientTimeout(total=30, sock_connect=5)
    thin = UpstreamClient(base, pool_size=32, connect_timeout_s=5, max_body=64 * 1_048_576)

    async def with_aiohttp() -> None:
        async with session.request("GET", url, headers=HEADERS, data=None, timeout=timeout,
                                   allow_redirects=False) as resp:
            chunks = [chunk async for chunk in resp.content.iter_any()]
            resp.headers.copy(), b"".join(chunks), resp.content_type  # noqa: B018

    async def with_thin() -> None:
        await thin.request("GET", url, HEADERS, None, 30)

    loop = asyncio.get_running_loop()
    request = thin._serialise("GET", url.raw_path_qs, HEADERS, None)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    size = len(head) + int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    writer.close()
    floors = [(await loop.create_connection(lambda: Floor(size), "127.0.0.1", port))[1] for _ in range(callers)]

    async def floor() -> None:
        protocol = floors.pop()
        protocol.received, protocol.done = 0, loop.create_future()
        assert protocol.transport is not None
        protocol.transport.write(request)
        await protocol.done
        floors.append(protocol)

    async def cpu_per_request(one: Callable[[], Awaitable[None]]) -> float:
        async def caller() -> None:
            for _ in range(requests // callers):
                await one()
        start = time.process_time()
        await asyncio.gather(*(caller() for _ in range(callers)))
        return 1e6 * (time.process_time() - start) / requests

    variants = {"aiohttp": with_aiohttp, "thin": with_thin, "floor": floor}
    for one in variants.values():   # warm up: connections opened, caches filled
        await cpu_per_request(one)
    results: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            results[name].append(await cpu_per_request(variants[name]))
    await session.close()
    await thin.close()
    for protocol in floors:
        assert protocol.transport is not None
        protocol.transport.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="per round and variant (max 20000)")
    parser.add_argument("--rounds", type=int, default=9, help="max 15")
    args = parser.parse_args()
    if not 100 <= args.requests <= 20000 or not 1 <= args.rounds <= 15:
        parser.error("keep it bounded: 100..20000 requests, 1..15 rounds")
    processes = bench.Processes()
    tmp = Path(tempfile.mkdtemp(prefix="mediator-client-micro-"))
    try:
        port = bench.free_port()
        upstream = processes.start([sys.executable, str(HERE / "upstream.py"), "--port", str(port)], tmp / "up.log")
        bench.wait_for_200(f"http://127.0.0.1:{port}/api/api_fhir_r4/Medication/", upstream, tmp / "up.log")
        results = asyncio.run(measure(port, args.requests, args.rounds, 4))
    finally:
        processes.stop_all()
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}; {args.requests} GETs per round, {args.rounds} rounds")
    print("| client | CPU µs/request (median) | each round |")
    print("|---|---:|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.1f} | {' / '.join(f'{v:.0f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
