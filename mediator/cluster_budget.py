"""`scope: cluster`: one in-flight budget toward an upstream, shared by every mediator instance.

The budget is a Redis sorted set `<key_prefix>budget:<digest of upstream>` whose members are leases
(`<instance id>:<n>`, one per request with openIMIS) scored by their expiry on Redis's clock. Taking a
lease is one Lua step: drop expired leases, count the rest, add ours if the count is below the limit. A
live instance renews the leases it holds every third of `lease_ttl_s`; the leases of an instance that
died (kill -9, a lost host) are not renewed and stop counting after `lease_ttl_s`. So the count is the
requests in flight cluster-wide, give or take those of an instance that died in the last `lease_ttl_s`.

Priorities hold across instances: an instance with requests waiting announces its highest waiting
priority in the hash `<key_prefix>budget-waiting:<digest>` (instance -> priority and a notice expiry on
Redis's clock, renewed at every poll), and the take step refuses a lease to a lower-priority request
while a more urgent one waits elsewhere.

Redis errors are raised (`STORE_ERRORS`) and the bulkhead applies the declared `on_store_error`.
A lease whose release failed (Redis gone at that moment) is not renewed and expires by itself.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
from typing import Any

from mediator.config.models import ClusterBudgetConfig
from mediator.logs import JsonEvent
from mediator.redis_store import STORE_ERRORS, RedisStore

log = logging.getLogger("mediator.cluster_budget")

# KEYS[1] budget set, KEYS[2] waiting hash (instance -> "<priority>:<expiry ms>"); ARGV: limit, lease ttl
# (ms), member, priority of this request, instance, priority this instance has waiting (-1: none),
# how long that notice lasts (ms). Returns 1 (taken) or 0 (budget full, or a more urgent request waits
# at another instance: priorities hold across instances).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local priority = tonumber(ARGV[4])
if tonumber(ARGV[6]) >= 0 then
  redis.call('HSET', KEYS[2], ARGV[5], ARGV[6] .. ':' .. (now + tonumber(ARGV[7])))
  redis.call('PEXPIRE', KEYS[2], 2 * tonumber(ARGV[2]))
else
  redis.call('HDEL', KEYS[2], ARGV[5])
end
local waiting = redis.call('HGETALL', KEYS[2])
for i = 1, #waiting, 2 do
  if waiting[i] ~= ARGV[5] then
    local sep = string.find(waiting[i + 1], ':', 1, true)
    local other = tonumber(string.sub(waiting[i + 1], 1, sep - 1))
    local expiry = tonumber(string.sub(waiting[i + 1], sep + 1))
    if expiry < now then
      redis.call('HDEL', KEYS[2], waiting[i])
    elseif other > priority then
      return 0
    end
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
return 1
"""

# KEYS[1] budget set; ARGV: lease ttl (ms), members... Extends the leases still present (XX: one that
# expired meanwhile is not brought back).
_RENEW = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[1]))
return #ARGV - 1
"""


class ClusterBudget:
    """Leases toward one upstream. Used from one event loop."""

    def __init__(self, upstream: str, config: ClusterBudgetConfig, redis: RedisStore) -> None:
        self.config = config
        self.key = redis.key("budget", upstream)
        self.waiting_key = redis.key("budget-waiting", upstream)
        self.held: set[str] = set()
        self._redis = redis
        # Unique per process and start: two instances never mint the same member.
        self._instance = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._numbers = itertools.count()
        self._ttl_ms = max(1, int(config.lease_ttl_s * 1000))
        self._take: Any = None
        self._renew: Any = None
        self._renewer: asyncio.Task[None] | None = None

    async def take(self, limit: int, priority: int = 0, waiting: int = -1) -> str | None:
        """A lease (its member name) if fewer than `limit` are held cluster-wide and no other instance
        has a request of higher priority than `priority` waiting, else None. `waiting`: the highest
        priority waiting at this instance (-1: none), announced to the others for a few poll intervals."""
        if self._take is None:
            self._take = self._redis.client.register_script(_TAKE)
        member = f"{self._instance}:{next(self._numbers)}"
        notice_ms = max(50, int(self.config.poll_interval_s * 4000))
        taken = await self._take(keys=[self.key, self.waiting_key],
                                 args=[limit, self._ttl_ms, member, priority, self._instance, waiting, notice_ms])
        if not taken:
            return None
        self.held.add(member)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_while_held())
        return member

    async def give_back(self, member: str) -> None:
        self.held.discard(member)
        await self._redis.client.zrem(self.key, member)

    async def count(self) -> int:
        """Leases held cluster-wide now (expired ones excluded); for tests and operators."""
        return int(await self._redis.client.zcount(self.key, "(" + str(await self._now_ms()), "+inf"))

    async def _now_ms(self) -> int:
        seconds, micros = await self._redis.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def _renew_while_held(self) -> None:
        if self._renew is None:
            self._renew = self._redis.client.register_script(_RENEW)
        while self.held:
            await asyncio.sleep(self.config.lease_ttl_s / 3)
            if not self.held:
                return
            try:
                await self._renew(keys=[self.key], args=[self._ttl_ms, *sorted(self.held)])
            except STORE_ERRORS as exc:
                # The leases may lapse and the cluster admit more than the budget until Redis is back.
                log.warning(JsonEvent.of("cluster_budget.renew_failed", error=type(exc).__name__, detail=str(exc)))

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
