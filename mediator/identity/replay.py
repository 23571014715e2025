"""Seen-`jti` stores: a token identifier is accepted once until its token expires.

`RedisReplayStore` (SET NX with expiry) is shared by every instance; `MemoryReplayStore` serves the
embedded default of a single instance. A store failure refuses the token (fail closed).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as redis
from redis.exceptions import RedisError


class ReplayStoreUnavailable(Exception):
    pass


class ReplayStore(Protocol):
    async def first_use(self, namespace: str, jti: str, expires_at: float) -> bool:
        """True the first time (namespace, jti) is seen; False when it was seen before."""
        ...

    async def close(self) -> None: ...


def _digest(namespace: str, jti: str) -> str:
    # Hashed: jti values are attacker-chosen strings; the key stays bounded and printable.
    return hashlib.sha256(f"{namespace}\x00{jti}".encode()).hexdigest()


class MemoryReplayStore:
    def __init__(self, clock: Callable[[], float] = time.time, max_entries: int = 100_000) -> None:
        self._seen: dict[str, float] = {}
        self._clock = clock
        self._max_entries = max_entries

    async def first_use(self, namespace: str, jti: str, expires_at: float) -> bool:
        now = self._clock()
        if len(self._seen) >= self._max_entries:
            self._seen = {k: v for k, v in self._seen.items() if v > now}
            if len(self._seen) >= self._max_entries:
                raise ReplayStoreUnavailable("too many live token ids")
        key = _digest(namespace, jti)
        previous = self._seen.get(key)
        if previous is not None and previous > now:
            return False
        self._seen[key] = expires_at
        return True

    async def close(self) -> None:
        self._seen.clear()


class RedisReplayStore:
    def __init__(self, url: str, prefix: str, clock: Callable[[], float] = time.time) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._prefix = prefix
        self._clock = clock

    async def first_use(self, namespace: str, jti: str, expires_at: float) -> bool:
        ttl_ms = max(1000, int((expires_at - self._clock()) * 1000))
        try:
            created = await self._client.set(self._prefix + _digest(namespace, jti), b"1", nx=True, px=ttl_ms)
        except (RedisError, OSError) as exc:
            raise ReplayStoreUnavailable(type(exc).__name__) from None
        return bool(created)

    async def ping(self) -> bool:
        """Readiness: Redis answers (raises RedisError/OSError when it does not)."""
        return bool(await self._client.ping())

    async def close(self) -> None:
        await self._client.aclose()
