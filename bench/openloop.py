"""Fixed-rate, open-loop HTTP load (what wrk2 does; wrk2 is not packaged in Debian).

Request i is due at start + i/rate whatever happened to earlier ones. Its latency is measured from
that due time, not from when a connection became free, so a stalled server is charged for the whole
wait (no coordinated omission). Raw keep-alive sockets: no client library work in the measurement.

Usage: python bench/openloop.py --url http://127.0.0.1:8080/fhir/Medication/ --rate 1000 --duration 10
       [--header 'Authorization: Bearer ...']
Prints one JSON object: requested/achieved rate, count, errors, p50/p90/p99/max latency in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def exchange(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at >= 0:
            length = int(lower[at + 17: lower.find(b"\r\n", at + 2)])
        elif b"transfer-encoding: chunked" in lower:
            raise ValueError("chunked answers are not expected from the benchmark target")
        await self.reader.readexactly(length)
        return status


async def run(url: str, rate: float, duration: float, connections: int,
              headers: list[str] | None = None) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    extra = "".join(f"{h}\r\n" for h in headers or ())
    request = (f"GET {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1\r\n"
               f"Host: {parts.netloc}\r\nAccept: application/fhir+json\r\n{extra}\r\n").encode()
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(Connection(*await asyncio.open_connection(host, port)))
    total = int(rate * duration)
    latencies: list[float] = []
    errors = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(due: float) -> None:
        nonlocal errors
        connection = await idle.get()
        try:
            status = await connection.exchange(request)
            if status != 200:
                errors += 1
            latencies.append(time.perf_counter() - due)
            idle.put_nowait(connection)
        except (OSError, ValueError, asyncio.IncompleteReadError):
            errors += 1
            connection.writer.close()
            idle.put_nowait(Connection(*await asyncio.open_connection(host, port)))

    start = time.perf_counter() + 0.05
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    while not idle.empty():
        idle.get_nowait().writer.close()
    latencies.sort()

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 3) if latencies else -1.0

    return {"rate": rate, "achieved_rate": round(len(latencies) / elapsed, 1), "count": len(latencies),
            "errors": errors, "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
            "max_ms": round(latencies[-1] * 1000, 3) if latencies else -1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (bounded: at most 60)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    args = parser.parse_args()
    if not 0 < args.duration <= 60 or not 0 < args.rate <= 100_000:
        parser.error("duration must be in (0, 60] s and rate in (0, 100000] req/s")
    print(json.dumps(asyncio.run(run(args.url, args.rate, args.duration, args.connections, args.header))))


if __name__ == "__main__":
    main()
