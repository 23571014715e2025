"""Prints rate-limit decision costs: in-process GCRA and the Redis script (one round trip).

Usage: .venv/bin/python bench/rate_limit.py [redis://127.0.0.1:6379/0]
Writes only keys under a random prefix and deletes them afterwards.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid

from mediator.config.models import RedisConfig
from mediator.gcra import GcraLimit, LocalGcraStore
from mediator.redis_store import RedisStore
from mediator.stages.rate_limit import RedisGcraStore

LIMITS = [GcraLimit("per-client", 600, 60, 100_000, 10_000_000, 100),
          GcraLimit("per-user", 120, 60, 500_000, 60_000_000, 120)]


async def main(url: str) -> None:
    local = LocalGcraStore()
    n = 200_000
    started = time.perf_counter()
    for i in range(n):
        local.apply([f"c{i % 1000}", f"u{i % 5000}"], LIMITS, 1)
    print(f"local GCRA, 2 limits: {n / (time.perf_counter() - started):,.0f} decisions/s")

    prefix = f"bench-{uuid.uuid4().hex}:"
    redis = RedisStore(RedisConfig(url=url, key_prefix=prefix))
    store = RedisGcraStore(redis)
    try:
        latencies = []
        for i in range(5000):
            t = time.perf_counter()
            await store.apply([f"c{i % 100}", f"u{i % 500}"], LIMITS, 1)
            latencies.append(time.perf_counter() - t)
        latencies.sort()
        print(f"Redis GCRA, 2 limits, sequential: p50 {statistics.median(latencies) * 1e6:.0f} us, "
              f"p99 {latencies[int(len(latencies) * 0.99)] * 1e6:.0f} us")
        total, workers = 20_000, 64
        started = time.perf_counter()

        async def worker(w: int) -> None:
            for i in range(w, total, workers):
                await store.apply([f"c{i % 100}", f"u{i % 500}"], LIMITS, 1)

        await asyncio.gather(*(worker(w) for w in range(workers)))
        print(f"Redis GCRA, 2 limits, {workers} concurrent callers: "
              f"{total / (time.perf_counter() - started):,.0f} decisions/s")
    finally:
        keys = [k async for k in redis.client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await redis.client.delete(*keys)
        await redis.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0"))
