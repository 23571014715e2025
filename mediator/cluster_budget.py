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

The budget is the smallest limit of the live instances: each take announces its instance's limit in
the hash `<key_prefix>budget-limits:<digest>` (instance -> "<limit>:<expiry>", valid lease_ttl_s), and
the count is compared with the smallest one. The instances measure the same openIMIS but their
controllers move apart (growth needs a window that used the whole limit, which the instance holding the
leases sees more often); the most careful estimate is the one that keeps openIMIS's web users served.

A limit below 1 (a duty cycle) is paced cluster-wide: the lease given back after an answer that took t
sets the key `<key_prefix>budget-pace:<digest>` for t × (1/limit − 1), and no lease is taken while it
exists, so two instances at 0.5 leave openIMIS idle half the time together, not each pacing its own
requests while the other fills the gaps.

Redis errors are raised (`STORE_ERRORS`) and the bulkhead applies the declared `on_store_error`.
A lease whose release failed (Redis gone at that moment) is not renewed and expires by itself.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
from dataclasses import dataclass
from typing import Any

from mediator.config.models import ClusterBudgetConfig
from mediator.logs import JsonEvent
from mediator.redis_store import STORE_ERRORS, RedisStore

log = logging.getLogger("mediator.cluster_budget")

# KEYS[1] budget set, KEYS[2] waiting hash (instance -> "<priority>:<expiry ms>"), KEYS[3] pace key (exists
# while a duty cycle keeps openIMIS idle), KEYS[4] limits hash (instance -> "<limit>:<expiry ms>"); ARGV:
# this instance's limit (may be fractional), lease ttl (ms), member, priority of this request, instance,
# priority this instance has waiting (-1: none), how long that notice lasts (ms). Returns the smallest
# live limit as text (taken; the budget was max(1, floor of it)) or 0 (budget full, or a more urgent
# request waits at another instance: priorities hold across instances, or the duty cycle's pause is not
# over).
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
redis.call('HSET', KEYS[4], ARGV[5], ARGV[1] .. ':' .. (now + tonumber(ARGV[2])))
redis.call('PEXPIRE', KEYS[4], 2 * tonumber(ARGV[2]))
local smallest = tonumber(ARGV[1])
local limits = redis.call('HGETALL', KEYS[4])
for i = 1, #limits, 2 do
  local sep = string.find(limits[i + 1], ':', 1, true)
  local expiry = tonumber(string.sub(limits[i + 1], sep + 1))
  if expiry < now then
    redis.call('HDEL', KEYS[4], limits[i])
  else
    smallest = math.min(smallest, tonumber(string.sub(limits[i + 1], 1, sep - 1)))
  end
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  return 0
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= math.max(1, math.floor(smallest)) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
return tostring(smallest)
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


# KEYS[1] budget set, KEYS[2] pace key; ARGV: member, pause (ms; 0: none). Gives the lease back and, for a
# duty cycle, starts the pause in the same step (no instance takes a lease between the two).
_GIVE_BACK = """
redis.call('ZREM', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Lease:
    member: str
    cluster_limit: float
    """The smallest limit of the live instances when it was taken (paces a duty cycle)."""


class ClusterBudget:
    """Leases toward one upstream. Used from one event loop."""

    def __init__(self, upstream: str, config: ClusterBudgetConfig, redis: RedisStore) -> None:
        self.config = config
        self.key = redis.key("budget", upstream)
        self.waiting_key = redis.key("budget-waiting", upstream)
        self.pace_key = redis.key("budget-pace", upstream)
        self.limits_key = redis.key("budget-limits", upstream)
        self.held: set[str] = set()
        self._redis = redis
        # Unique per process and start: two instances never mint the same member.
        self._instance = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._numbers = itertools.count()
        self._ttl_ms = max(1, int(config.lease_ttl_s * 1000))
        self._take: Any = None
        self._release: Any = None
        self._renew: Any = None
        self._renewer: asyncio.Task[None] | None = None
        self._closed = False

    async def take(self, limit: float, priority: int = 0, waiting: int = -1) -> Lease | None:
        """A lease if fewer than the smallest live instance's limit (this one's: `limit`; at least 1) are
        held cluster-wide, no duty-cycle pause runs and no other instance has a request of higher
        priority than `priority` waiting, else None. `waiting`: the highest priority waiting at this
        instance (-1: none), announced to the others for a few poll intervals."""
        if self._take is None:
            self._take = self._redis.client.register_script(_TAKE)
        member = f"{self._instance}:{next(self._numbers)}"
        notice_ms = max(50, int(self.config.poll_interval_s * 4000))
        taken = await self._take(keys=[self.key, self.waiting_key, self.pace_key, self.limits_key],
                                 args=[repr(float(limit)), self._ttl_ms, member, priority, self._instance, waiting,
                                       notice_ms])
        if not taken:
            return None
        self.held.add(member)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_while_held())
        return Lease(member, float(taken))

    async def give_back(self, member: str, pause_s: float = 0.0) -> None:
        """The lease is free again; `pause_s` > 0 (a duty cycle): no instance takes one for that long."""
        self.held.discard(member)
        if self._release is None:
            self._release = self._redis.client.register_script(_GIVE_BACK)
        await self._release(keys=[self.key, self.pace_key], args=[member, int(pause_s * 1000)])

    async def count(self) -> int:
        """Leases held cluster-wide now (expired ones excluded); for tests and operators."""
        return int(await self._redis.client.zcount(self.key, "(" + str(await self._now_ms()), "+inf"))

    async def _now_ms(self) -> int:
        seconds, micros = await self._redis.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def _renew_while_held(self) -> None:
        if self._renew is None:
            self._renew = self._redis.client.register_script(_RENEW)
        while self.held and not self._closed:
            await asyncio.sleep(self.config.lease_ttl_s / 3)
            if not self.held or self._closed:
                return
            try:
                await self._renew(keys=[self.key], args=[self._ttl_ms, *sorted(self.held)])
            except STORE_ERRORS as exc:
                # The leases may lapse and the cluster admit more than the budget until Redis is back.
                log.warning(JsonEvent.of("cluster_budget.renew_failed", error=type(exc).__name__, detail=str(exc)))

    async def close(self) -> None:
        # The flag as well as the cancel: a cancellation that arrives inside a Redis call can be swallowed by
        # the client (redis-py), and the renewer would then loop on forever with its leases.
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
