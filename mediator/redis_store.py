"""The one Redis client of an application, shared by every feature that keeps state across instances.

`server.redis` in channels.yaml configures it (absent: features keep their state in process memory).
The client is created lazily inside the running event loop (no I/O at construction) and closed by the
Runtime that holds it last (`mediator.app.Runtime.close_retired`: at shutdown, or after a reload that
changed server.redis, once the requests on the old configuration have finished).
Commands are never retried by the client: a retried EVALSHA could count a request twice, so an error
goes straight to the feature, whose declared `on_store_error` decides.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
from collections.abc import Mapping

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from mediator.config.models import RedisConfig

# What a failing or unreachable Redis raises through redis.asyncio.
STORE_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)


@functools.lru_cache(maxsize=4096)
def _digest(parts: tuple[str, ...]) -> str:
    """Pure, and the same few keys (per client, per user) come with every request: remembered (bounded)."""
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()[:40]


class RedisStore:
    """Handle on the app's Redis client. `configured` is False when channels.yaml has no server.redis.

    Safe for concurrent use by many requests (redis.asyncio pools connections).
    """

    def __init__(self, config: RedisConfig | None, environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self._environ = environ if environ is not None else os.environ
        self._client: aioredis.Redis | None = None

    @property
    def configured(self) -> bool:
        return self.config is not None

    @property
    def client(self) -> aioredis.Redis:
        if self.config is None:
            raise RuntimeError("no server.redis configured")
        if self._client is None:
            password = self._environ.get(self.config.password_env) if self.config.password_env else None
            # A blocking pool: a burst of requests waits (up to timeout_s) for a connection instead of
            # failing at once with MaxConnectionsError, as the default pool does.
            pool = aioredis.BlockingConnectionPool.from_url(
                self.config.url, password=password, max_connections=self.config.max_connections,
                timeout=self.config.timeout_s, socket_timeout=self.config.timeout_s,
                socket_connect_timeout=self.config.connect_timeout_s, retry=Retry(NoBackoff(), 0))
            self._client = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() disconnects it
        return self._client

    def key(self, feature: str, *parts: str) -> str:
        """`<key_prefix><feature>:<digest of parts>`: bounded length, no separator confusion between parts."""
        prefix = self.config.key_prefix if self.config is not None else ""
        return f"{prefix}{feature}:{_digest(parts)}"

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
