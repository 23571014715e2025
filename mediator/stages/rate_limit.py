"""Stage 6: rate limits (policies/rate_limits.yaml), GCRA shared by every instance through Redis.

The arithmetic (GCRA: one theoretical arrival time per key, integer microseconds so that Python and
Lua compute the same thing) is mediator/gcra.py's.

`gcra` and `decide` are the arithmetic, pure (no clock, no I/O). The stores apply them atomically:
`LocalGcraStore` in process memory (no Redis configured, or `on_store_error: local`), `RedisGcraStore`
with one Lua script call per request (the same arithmetic, all of a request's limits at once: either
every limit admits the request and all are charged, or none is), and `ReconciledGcraStore`
(`reconcile:` in the policy): decided in this process's memory, the charges sent to Redis and the
shared state taken back by one background script call per interval (no request waits for Redis).

Bound of the reconciled mode, per key: an instance's view misses what the other instances admitted since
they last reported it (at most one interval of their admissions, plus a full burst for an instance that
had not seen the key or whose view is older than its last reconciliation). So N instances together
admit at most what one exact limiter admits over the same time plus (N-1) x (burst + rate x interval +
the largest request cost); tests/stages/test_rate_limit.py measures it with two and three instances.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from redis.commands.core import AsyncScript

from mediator.config import Config
from mediator.config.rate_limits import RateLimitsPolicy, Reconcile
from mediator.gcra import GcraLimit, GcraResult, LocalGcraStore, decide, now_us
from mediator.logs import JsonEvent
from mediator.metrics import Metrics
from mediator.pipeline import Decision, Exchange
from mediator.redis_store import STORE_ERRORS, RedisStore

log = logging.getLogger("mediator.rate_limit")

# KEYS: one per limit. ARGV[1]: now in microseconds, or '' for Redis's own clock (one clock for every
# instance); ARGV[2]: cost; then emission_us, tolerance_us per key.
# Returns {now, admitted (1/0), stored TAT per key or -1}. Only when every limit admits are TATs written.
REDIS_GCRA = """
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end
local cost = tonumber(ARGV[2])
local result = {now, 1}
local new_tats = {}
for i, key in ipairs(KEYS) do
  local emission = tonumber(ARGV[1 + 2 * i])
  local tolerance = tonumber(ARGV[2 + 2 * i])
  local stored = redis.call('GET', key)
  local base = now
  if stored then
    stored = tonumber(stored)
    result[2 + i] = stored
    if stored > now then base = stored end
  else
    result[2 + i] = -1
  end
  local new_tat = base + emission * cost
  if new_tat - tolerance > now then result[2] = 0 end
  new_tats[i] = new_tat
end
if result[2] == 1 then
  for i, key in ipairs(KEYS) do
    local ttl_ms = math.ceil((new_tats[i] - now) / 1000) + 1
    redis.call('SET', key, string.format('%d', new_tats[i]), 'PX', ttl_ms)
  end
end
return result
"""


class RedisGcraStore:
    """GCRA state in Redis, shared by every mediator instance: one EVALSHA round trip per request."""

    def __init__(self, redis: RedisStore) -> None:
        self._redis = redis
        self._script: AsyncScript | None = None

    async def apply(self, keys: Sequence[str], limits: Sequence[GcraLimit], cost: int,
                    now: int | None = None) -> tuple[Decision, list[GcraResult]]:
        if self._script is None:
            self._script = self._redis.client.register_script(REDIS_GCRA)
        args: list[int | str] = ["" if now is None else now, cost]
        for limit in limits:
            args += [limit.emission_us, limit.tolerance_us]
        reply = await self._script(keys=[self._redis.key("rl", k) for k in keys], args=args)
        redis_now, admitted = int(reply[0]), bool(reply[1])
        states = [None if int(t) == -1 else int(t) for t in reply[2:]]
        decision, _, results = decide(states, limits, redis_now, cost)
        if decision.allow != admitted:
            log.error(JsonEvent.of("rate_limit.gcra_disagree", limits=[lim.name for lim in limits]))
        return decision, results


# KEYS: the keys to reconcile; ARGV[i]: microseconds of emission this instance charged to KEYS[i] since
# its last report (0: only read). Each key's TAT becomes max(TAT, now) + charged (Redis's clock); returns
# {now, TAT per key}. Exact-mode instances read and write the same keys with the same meaning.
REDIS_RECONCILE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local result = {now}
for i, key in ipairs(KEYS) do
  local charged = tonumber(ARGV[i])
  local stored = tonumber(redis.call('GET', key) or '0')
  local tat = now
  if stored > now then tat = stored end
  tat = tat + charged
  if charged > 0 then
    redis.call('SET', key, string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  end
  result[1 + i] = tat
end
return result
"""


class ReconciledGcraStore:
    """Local GCRA decisions; one background EVALSHA per `interval_ms` reports this instance's charges
    on the keys requested since the last one and takes back every instance's (the shared TAT, converted to
    this instance's clock). An instance that gets no requests makes no calls."""

    MAX_KEYS_PER_CALL = 500

    def __init__(self, redis: RedisStore, settings: Reconcile, on_error: Callable[[BaseException], None],
                 max_keys: int = 100_000) -> None:
        self._redis = redis
        self._interval_s = settings.interval_ms / 1000
        self._max_stale_s = settings.max_stale_s
        self._on_error = on_error
        self._max_keys = max_keys
        self._tats: dict[str, int] = {}
        self._charged: dict[str, int] = {}
        self._script: AsyncScript | None = None
        self._task: asyncio.Task[None] | None = None
        self._next_at = 0.0
        self.last_success = time.monotonic()
        """monotonic time of the last successful reconciliation (start counts as one)."""
        self._failing_since: float | None = None

    def stale(self) -> bool:
        """Reconciliations have been failing for longer than max_stale_s (an idle instance is not stale)."""
        return self._failing_since is not None and time.monotonic() - self._failing_since > self._max_stale_s

    def _failed(self, exc: BaseException) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        self._on_error(exc)

    def _succeeded(self) -> None:
        self.last_success = time.monotonic()
        self._failing_since = None

    def apply(self, keys: Sequence[str], limits: Sequence[GcraLimit], cost: int) -> tuple[Decision, list[GcraResult]]:
        now = now_us()
        decision, new_states, results = decide([self._tats.get(k) for k in keys], limits, now, cost)
        if decision.allow:
            for key, state, limit in zip(keys, new_states, limits, strict=True):
                assert state is not None
                self._tats[key] = state
                self._charged[key] = self._charged.get(key, 0) + limit.emission_us * cost
        else:  # refused: charge nothing, but read the key's shared state at the next reconciliation
            for key in keys:
                self._charged.setdefault(key, 0)
        self.schedule()
        return decision, results

    def schedule(self) -> None:
        """Start a background reconciliation if none is running and the interval has passed."""
        if self._task is None and time.monotonic() >= self._next_at:
            self._next_at = time.monotonic() + self._interval_s
            self._task = asyncio.get_running_loop().create_task(self._reconcile_in_background())

    async def _reconcile_in_background(self) -> None:
        try:
            await self.reconcile()
        except Exception:  # not a Redis error (those are handled inside): logged, the next call retries
            log.exception(JsonEvent.of("rate_limit.reconcile_crashed"))
        finally:
            self._task = None
            if self._charged:  # admitted while this call was in flight: report them next interval
                self._next_at = max(self._next_at, time.monotonic())

    async def reconcile(self) -> None:
        """Report the charges since the last call and adopt the shared state; on a Redis error the charges
        are kept for the next call (nothing is lost, the view just gets older)."""
        charged, self._charged = self._charged, {}
        if not charged:
            if self.stale():  # nothing to report, but a stale view must find out when Redis is back
                try:
                    await self._redis.client.ping()
                except STORE_ERRORS as exc:
                    self._failed(exc)
                    return
                self._succeeded()
            return
        if self._script is None:
            self._script = self._redis.client.register_script(REDIS_RECONCILE)
        keys = list(charged)
        try:
            for start in range(0, len(keys), self.MAX_KEYS_PER_CALL):
                chunk = keys[start:start + self.MAX_KEYS_PER_CALL]
                sent = now_us()
                reply = await self._script(keys=[self._redis.key("rl", k) for k in chunk],
                                           args=[charged[k] for k in chunk])
                offset = int(reply[0]) - (sent + now_us()) // 2  # Redis clock minus ours (± half a round trip)
                for key, shared in zip(chunk, reply[1:], strict=True):
                    del charged[key]  # reported: not to be sent again if a later chunk fails
                    view = int(shared) - offset
                    if view > self._tats.get(key, 0):
                        self._tats[key] = view
        except STORE_ERRORS as exc:
            for key, amount in charged.items():
                self._charged[key] = self._charged.get(key, 0) + amount
            self._failed(exc)
            return
        self._succeeded()
        if len(self._tats) > self._max_keys:
            now = now_us()
            self._tats = {k: v for k, v in self._tats.items() if v > now or k in self._charged}


CHARGED_BEFORE_LOOKUP = Decision.allowed("rate_limit.charged_before_lookup")


@dataclass(frozen=True, slots=True)
class Refused:
    """A key this instance refused: no request under it can be admitted before `admit_at_us`."""

    limit: GcraLimit
    admit_at_us: int
    full_at_us: int
    """When the key is back to a full burst (the RateLimit header's `t`)."""


class RecentRefusals:
    """Keys the rate-limit stage refused, with the earliest time a request of cost 1 could be admitted under
    each (the over-limit cache of envoyproxy/ratelimit, in process). GCRA state only moves later with time
    and admissions (of any instance), so until that time the exact limiter refuses every request under the
    key: refusing it early changes no decision, it only skips the work in between (body, authorization's
    lookups, the store round trip). Times are this process's clock, taken before the store decided, so they
    err early. At most `max_keys` entries: past that, expired ones are dropped, then the oldest."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._refused: dict[str, Refused] = {}
        self._max_keys = max_keys

    def record(self, key: str, limit: GcraLimit, result: GcraResult, cost: int, decided_at_us: int) -> None:
        # A refused result keeps base = max(TAT, now) as `tat`; cost 1 is admitted at base + T - tau.
        wait_us = result.retry_after_us - (cost - 1) * limit.emission_us
        if wait_us <= 0:
            return  # only this request's cost was too much: a smaller one may pass now
        if key not in self._refused and len(self._refused) >= self._max_keys:
            self._forget(decided_at_us)
        self._refused[key] = Refused(limit, decided_at_us + wait_us, decided_at_us + result.reset_us)

    def refusing(self, key: str, now_us: int) -> Refused | None:
        refused = self._refused.get(key)
        if refused is None:
            return None
        if refused.admit_at_us <= now_us:
            del self._refused[key]
            return None
        return refused

    def __len__(self) -> int:
        return len(self._refused)

    def _forget(self, now: int) -> None:
        self._refused = {k: r for k, r in self._refused.items() if r.admit_at_us > now}
        if len(self._refused) >= self._max_keys:   # insertion order: the older half goes
            newest = len(self._refused) - self._max_keys // 2
            self._refused = dict(itertools.islice(self._refused.items(), newest, None))


@dataclass(frozen=True, slots=True)
class RateLimitTable:
    """The compiled policy: for each channel, the limits that apply (with the policy's key parts)."""

    by_channel: Mapping[str, tuple[tuple[GcraLimit, tuple[str, ...]], ...]]
    max_body_bytes: int
    reconcile: Reconcile | None = None

    @classmethod
    def from_config(cls, config: Config) -> RateLimitTable | None:
        """None when policies/rate_limits.yaml is absent or declares no limits (no stage is built)."""
        policy = config.policies.get("rate_limits")
        if not isinstance(policy, RateLimitsPolicy) or not policy.limits:
            return None
        by_channel = {}
        for channel in config.channels.channels:
            by_channel[channel.name] = tuple(
                (GcraLimit.from_policy(limit), limit.per) for limit in policy.limits
                if limit.channels is None or channel.name in limit.channels)
        return cls(by_channel, config.channels.server.limits.max_body_bytes, policy.reconcile)


def key_for(per: Sequence[str], exchange: Exchange) -> list[str]:
    """The counting key of one limit for this request (see RateLimit: fallbacks when no principal)."""
    principal = exchange.principal
    parts = []
    for part in per:
        if part == "ip":
            parts.append(f"ip={exchange.client_ip}")
        elif part == "channel":
            parts.append(f"channel={exchange.channel.name if exchange.channel is not None else ''}")
        elif principal is None:
            parts.append(f"ip={exchange.client_ip}")  # a channel without authentication: the address is all we know
        elif part == "client":
            parts.append(f"client={principal.client_id}")
        elif part == "user":
            # Namespaced by who vouches for the user (Principal.user_key): another client naming the
            # same user id counts against its own key, never against this user's.
            user = principal.user_key
            parts.append(user if user is not None else f"client={principal.client_id}")
        else:  # health_facility: the one authorization resolved for this request, else the principal's
            facilities = [exchange.facility] if exchange.facility is not None else sorted(principal.health_facilities)
            parts.append("hf=" + ",".join(facilities) if facilities else f"client={principal.client_id}")
    return parts


def limit_key(limit: GcraLimit, per: Sequence[str], exchange: Exchange) -> str:
    """The counting key of one limit for this request (hashed into Redis by RedisStore.key)."""
    return f"rl:{limit.name}:" + "|".join(key_for(per, exchange))


def request_cost(exchange: Exchange) -> int:
    """A batch Bundle counts one per entry (the request stage parsed the body); anything else counts the
    openIMIS requests it may cause (`Exchange.upstream_cost`: 1, or 2 for facility-checked reads and
    facility-scoped searches, set by authorization)."""
    if exchange.fhir is None or exchange.fhir.interaction != "batch-or-transaction":
        return exchange.upstream_cost
    if exchange.body is None:
        return 1
    entries = exchange.body.document.get("entry")
    return max(1, len(entries)) if isinstance(entries, list) else 1


class RateLimitStage:
    """Charges every applicable limit; 429 rate_limit.exceeded with Retry-After and RateLimit headers.

    With Redis configured the counts are shared by every instance; a Redis error applies each limit's
    declared `on_store_error` (deny: 503 rate_limit.store_unavailable; local: this instance's memory).
    """

    name = "rate_limit"

    def __init__(self, table: RateLimitTable, redis: RedisStore, metrics: Metrics | None = None) -> None:
        self.table = table
        self.local = LocalGcraStore()
        self.shared = RedisGcraStore(redis) if redis.configured and table.reconcile is None else None
        self.reconciled = ReconciledGcraStore(redis, table.reconcile, self._reconcile_failed) \
            if redis.configured and table.reconcile is not None else None
        self._metrics = metrics
        self._last_store_warning = 0.0
        self.refusals = RecentRefusals()
        """What the over_limit stage refuses early (stages/over_limit.py)."""

    async def run(self, exchange: Exchange) -> Decision:
        if exchange.charged_before_lookup:
            return CHARGED_BEFORE_LOOKUP
        return await self.charge(exchange)

    async def charge(self, exchange: Exchange) -> Decision:
        """Charge the request to every limit of its channel (the lookup_charge stage calls this
        for requests whose authorization sends lookups to openIMIS; this stage for all others)."""
        channel = exchange.channel.name if exchange.channel is not None else ""
        applicable = self.table.by_channel.get(channel, ())
        if not applicable:
            return Decision.allowed("rate_limit.none")
        limits = [limit for limit, _ in applicable]
        keys = [limit_key(limit, per, exchange) for limit, per in applicable]
        cost = request_cost(exchange)
        started = now_us()  # before the store's clock read: the refusal memory errs early, never late
        if self.reconciled is not None:
            if self.reconciled.stale():
                self.reconciled.schedule()  # a probe: the view is fresh again once Redis answers
                decision, results = self._store_failed(None, keys, limits, cost)
            else:
                decision, results = self.reconciled.apply(keys, limits, cost)
        elif self.shared is None:
            decision, results = self.local.apply(keys, limits, cost)
        else:
            try:
                decision, results = await self.shared.apply(keys, limits, cost)
            except STORE_ERRORS as exc:
                decision, results = self._store_failed(exc, keys, limits, cost)
        if decision.allow:
            exchange.response_headers.update(decision.headers)
        elif decision.reason == "rate_limit.exceeded":
            for (limit, per), key, result in zip(applicable, keys, results, strict=True):
                if result.allowed:
                    continue
                if self._metrics is not None:
                    self._metrics.rate_limit_rejections.labels(limit.name, channel).inc()
                if "health_facility" not in per:  # its key may follow authorization's facts: not known earlier
                    self.refusals.record(key, limit, result, cost, started)
        return decision

    def _reconcile_failed(self, exc: BaseException) -> None:
        """A background reconciliation failed: counted and logged; requests keep being decided locally
        until the view is older than max_stale_s (then `_store_failed` applies on_store_error)."""
        if self._metrics is not None:
            self._metrics.store_errors.labels("rate_limit", "reconcile").inc()
        self._warn(JsonEvent.of("rate_limit.reconcile_failed", error=type(exc).__name__, effect="deciding locally"))

    def _warn(self, event: JsonEvent) -> None:
        now = time.monotonic()
        if now - self._last_store_warning > 10:  # one line per 10 s, not one per request
            self._last_store_warning = now
            log.warning(event)

    def _store_failed(self, exc: BaseException | None, keys: list[str], limits: list[GcraLimit],
                      cost: int) -> tuple[Decision, list[GcraResult]]:
        """Redis failed (exc), or the reconciled view is older than max_stale_s (None): on_store_error."""
        strict = [limit.name for limit in limits if limit.on_store_error == "deny"]
        mode = "deny" if strict else "local"
        if self._metrics is not None:
            self._metrics.store_errors.labels("rate_limit", mode).inc()
        cause = type(exc).__name__ if exc is not None else "no reconciliation within max_stale_s"
        self._warn(JsonEvent.of("rate_limit.store_failed", error=cause, on_store_error=mode))
        if strict:
            return Decision.denied("rate_limit.store_unavailable", 503,
                                   f"rate limit store unavailable (limit {strict[0]} denies then)",
                                   {"Retry-After": "1"}), []
        if self.reconciled is not None:  # its own memory is this instance's count; reconciliation retries
            return self.reconciled.apply(keys, limits, cost)
        return self.local.apply(keys, limits, cost)
