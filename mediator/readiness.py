"""Readiness (`GET /readyz`, ops listener only): a real, recent probe of everything a request needs.

Each dependency is probed for real — openIMIS with one small authenticated request (`OpenImisUpstream.
probe`), Redis (server.redis and a Redis replay store) with PING — never judged by a cached login token.
A result is reused for `interval_s` (probes from several orchestrators must not become load on
openIMIS); at most one probe per dependency runs at a time, all dependencies are probed concurrently,
and each probe is bounded by `timeout_s`, so /readyz answers within about `timeout_s`.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

if TYPE_CHECKING:
    from mediator.app import Runtime

PROBE_INTERVAL_S = 5.0
PROBE_TIMEOUT_S = 3.0


@dataclass(slots=True)
class _Probe:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    checked_at: float = float("-inf")
    ok: bool = False


async def redis_answers(ping: Callable[[], Awaitable[Any]], timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            return bool(await ping())
    except (RedisError, OSError, TimeoutError):
        return False


class Readiness:
    """One per application (shared by the ops listener); follows reloads (probes are kept per object)."""

    def __init__(self, interval_s: float = PROBE_INTERVAL_S, timeout_s: float = PROBE_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._probes: weakref.WeakKeyDictionary[object, _Probe] = weakref.WeakKeyDictionary()

    async def _recent(self, target: object, probe: Callable[[], Awaitable[bool]]) -> bool:
        state = self._probes.get(target)
        if state is None:
            state = self._probes[target] = _Probe()
        if self._clock() - state.checked_at < self.interval_s:
            return state.ok
        async with state.lock:
            if self._clock() - state.checked_at < self.interval_s:
                return state.ok   # probed while we waited for the lock
            try:
                state.ok = await probe()
            finally:
                state.checked_at = self._clock()
        return state.ok

    async def report(self, runtime: Runtime) -> tuple[bool, dict[str, Any]]:
        """(ready, JSON body): `upstreams` name → reachable; `redis` / `replay_store` when configured."""
        checks: dict[tuple[str, str], Awaitable[bool]] = {}
        for name, upstream in runtime.upstreams.items():
            checks[("upstreams", name)] = self._recent(upstream, partial(upstream.probe, self.timeout_s))
        if runtime.redis.configured:
            client = runtime.redis.client
            checks[("redis", "")] = self._recent(runtime.redis,
                                                 lambda: redis_answers(client.ping, self.timeout_s))
        replay_ping = getattr(runtime.identity.replay, "ping", None)
        if replay_ping is not None:
            checks[("replay_store", "")] = self._recent(runtime.identity.replay,
                                                        lambda: redis_answers(replay_ping, self.timeout_s))
        results = dict(zip(checks, await asyncio.gather(*checks.values()), strict=True))
        body: dict[str, Any] = {"config": "loaded",
                                "upstreams": {name: ok for (kind, name), ok in results.items() if kind == "upstreams"}}
        for (kind, _), ok in results.items():
            if kind != "upstreams":
                body[kind] = "up" if ok else "down"
        ready = all(results.values())
        return ready, {"status": "ready" if ready else "not ready", **body}
