"""Refuse, before the body is read and before authorization looks anything up, a caller this instance has
just refused and whose rate limit cannot have refilled yet.

Runs right after authentication (the rate limits' keys need the principal). The rate-limit stage runs
last (its cost and its `health_facility` key follow authorization), so without this step a caller over
its limit would still have its body parsed, its write checked and, for a read of a claim whose owner is
not cached, one claim-index lookup sent to openIMIS per request before the 429: work an attacker can
multiply. `RecentRefusals` (stages/rate_limit.py) remembers, per key the rate-limit stage refused, the
earliest time any request could be admitted under it; until then the answer is the one the rate-limit
stage would give (429 `rate_limit.exceeded`, Retry-After, RateLimit headers of the limit that refuses),
with no Redis round trip. It never refuses what the rate-limit stage would admit (GCRA state only moves
later, whatever other instances admit); `tests/stages/test_over_limit.py` checks that against the exact
limiter on random traffic. Limits keyed by `health_facility` are left to the rate-limit stage.
"""

from __future__ import annotations

from mediator.gcra import GcraResult, now_us, rate_limit_headers
from mediator.metrics import Metrics
from mediator.pipeline import Decision, Exchange
from mediator.stages.rate_limit import RateLimitTable, RecentRefusals, limit_key

CLEAR = Decision.allowed("over_limit.clear")


class OverLimitStage:
    name = "over_limit"

    def __init__(self, table: RateLimitTable, refusals: RecentRefusals, metrics: Metrics | None = None) -> None:
        self.table = table
        self.refusals = refusals
        self._metrics = metrics

    async def run(self, exchange: Exchange) -> Decision:
        if not len(self.refusals):
            return CLEAR
        channel = exchange.channel.name if exchange.channel is not None else ""
        now = now_us()
        for limit, per in self.table.by_channel.get(channel, ()):
            if "health_facility" in per:
                continue
            refused = self.refusals.refusing(limit_key(limit, per, exchange), now)
            if refused is None:
                continue
            if self._metrics is not None:
                self._metrics.rate_limit_rejections.labels(limit.name, channel).inc()
            wait_us = refused.admit_at_us - now
            headers = rate_limit_headers([limit], [GcraResult(False, 0, 0, wait_us, refused.full_at_us - now)])
            headers["Retry-After"] = str(max(1, -(-wait_us // 1_000_000)))
            return Decision.denied("rate_limit.exceeded", 429, f"rate limit exceeded: {limit.name}", headers)
        return CLEAR
