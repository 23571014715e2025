"""GCRA, the generic cell rate algorithm: the arithmetic and the in-process store.

Shared by the rate-limit stage (stages/rate_limit.py: its Redis store runs the same arithmetic in Lua)
and the token endpoint's per-address admission (identity/), below both.

GCRA (the generic cell rate algorithm) keeps one number per key: the theoretical arrival time (TAT) of
the next request. A limit of `rate` per `period_s` with `burst` has an emission interval
T = period/rate and a tolerance tau = T * burst; a request of cost c is admitted when
max(TAT, now) + c*T - tau <= now, and then TAT becomes max(TAT, now) + c*T. All times are integer
microseconds so that Python and Lua compute exactly the same thing.

`gcra` and `decide` are the arithmetic, pure (no clock, no I/O). The stores apply them atomically:
`LocalGcraStore` in process memory (no Redis configured, or `on_store_error: local`), `RedisGcraStore`
with one Lua script call per request (the same arithmetic, all of a request's limits at once: either
every limit admits the request and all are charged, or none is).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from mediator.config.rate_limits import RateLimit
from mediator.decision import Decision


@dataclass(frozen=True, slots=True)
class GcraLimit:
    """A compiled limit. `emission_us` = T, `tolerance_us` = tau = T * burst."""

    name: str
    quota: int
    window_s: int
    emission_us: int
    tolerance_us: int
    burst: int
    on_store_error: str = "deny"

    @classmethod
    def from_policy(cls, limit: RateLimit) -> GcraLimit:
        emission = limit.period_s * 1_000_000 // limit.rate
        return cls(limit.name, limit.rate, limit.period_s, emission, emission * limit.effective_burst,
                   limit.effective_burst, limit.on_store_error)


@dataclass(frozen=True, slots=True)
class GcraResult:
    allowed: bool
    tat: int
    """The state to keep if the request is admitted (if refused, the state is left as it was)."""
    remaining: int
    retry_after_us: int
    reset_us: int
    """Until the key is back to a full burst."""


def gcra(tat: int | None, limit: GcraLimit, now: int, cost: int = 1) -> GcraResult:
    """One limit, one request: the pure arithmetic (the Lua script in REDIS_GCRA does the same)."""
    base = now if tat is None or tat < now else tat
    new_tat = base + limit.emission_us * cost
    allow_at = new_tat - limit.tolerance_us
    if allow_at > now:
        remaining = max(0, (limit.tolerance_us - (base - now)) // limit.emission_us)
        return GcraResult(False, base, remaining, allow_at - now, base - now)
    remaining = (limit.tolerance_us - (new_tat - now)) // limit.emission_us
    return GcraResult(True, new_tat, remaining, 0, new_tat - now)


def _seconds(us: int) -> int:
    return math.ceil(us / 1_000_000)


def _sf_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@functools.lru_cache(maxsize=256)
def _policy_header(limits: tuple[GcraLimit, ...]) -> str:
    """RateLimit-Policy: the same text for every request of a channel (limits are immutable)."""
    return ", ".join(f"{_sf_string(limit.name)};q={limit.quota};w={limit.window_s}" for limit in limits)


def rate_limit_headers(limits: Sequence[GcraLimit], results: Sequence[GcraResult]) -> dict[str, str]:
    """RateLimit-Policy and RateLimit, structured-field form of draft-ietf-httpapi-ratelimit-headers-10."""
    policy = _policy_header(tuple(limits))
    current = ", ".join(f"{_sf_string(limit.name)};r={result.remaining};t={_seconds(result.reset_us)}"
                        for limit, result in zip(limits, results, strict=True))
    return {"RateLimit-Policy": policy, "RateLimit": current}


def decide(states: Sequence[int | None], limits: Sequence[GcraLimit], now: int,
           cost: int = 1) -> tuple[Decision, list[int | None], list[GcraResult]]:
    """All of a request's limits: admitted only if every one admits it; then every state advances."""
    results = [gcra(state, limit, now, cost) for state, limit in zip(states, limits, strict=True)]
    headers = rate_limit_headers(limits, results)
    too_big = [limit.name for limit in limits if cost > limit.burst]
    if too_big:
        return (Decision.denied("rate_limit.cost_exceeds_burst", 429,
                                f"this request counts {cost} and limit {too_big[0]} admits at most "
                                f"{min(lim.burst for lim in limits)} at once; send smaller batches",
                                headers), list(states), results)
    refused = [(limit, result) for limit, result in zip(limits, results, strict=True) if not result.allowed]
    if refused:
        wait = max(result.retry_after_us for _, result in refused)
        names = ", ".join(limit.name for limit, _ in refused)
        headers["Retry-After"] = str(max(1, _seconds(wait)))
        return (Decision.denied("rate_limit.exceeded", 429, f"rate limit exceeded: {names}", headers),
                list(states), results)
    return Decision(True, "rate_limit.allowed", 200, "", headers), [r.tat for r in results], results


def now_us() -> int:
    return time.time_ns() // 1000


class LocalGcraStore:
    """GCRA state in this process's memory. No awaits inside `apply`, so it is atomic on the event loop.

    Keys whose TAT lies in the past carry no information and are dropped when the table grows.
    """

    def __init__(self, max_keys: int = 100_000) -> None:
        self._tats: dict[str, int] = {}
        self._max_keys = max_keys

    def apply(self, keys: Sequence[str], limits: Sequence[GcraLimit], cost: int,
              now: int | None = None) -> tuple[Decision, list[GcraResult]]:
        now = now_us() if now is None else now
        decision, new_states, results = decide([self._tats.get(k) for k in keys], limits, now, cost)
        if decision.allow:
            for key, state in zip(keys, new_states, strict=True):
                assert state is not None  # an admitted request always has a new TAT
                self._tats[key] = state
            if len(self._tats) > self._max_keys:
                self._tats = {k: v for k, v in self._tats.items() if v > now}
        return decision, results
