"""Replica fixtures: stores (memory, and a real Redis under a per-test key prefix, deleted afterwards)."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis

from mediator.replica.store import MemoryReplicaStore, RedisReplicaStore

REDIS_URL = "redis://127.0.0.1:6379/0"


def unique_prefix() -> str:
    return f"test-replica-{uuid.uuid4().hex[:12]}:"


async def delete_prefix(prefix: str) -> None:
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_prefix():
    prefix = unique_prefix()
    yield prefix
    await delete_prefix(prefix)


@pytest.fixture(params=["memory", "redis"])
async def store(request, redis_prefix):
    made = MemoryReplicaStore() if request.param == "memory" else RedisReplicaStore(REDIS_URL, redis_prefix)
    await made.start()
    yield made
    await made.close()
