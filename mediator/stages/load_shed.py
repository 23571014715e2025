"""Refuse early, and cheaply, what the upstream's bulkhead or breaker would refuse anyway.

Runs right after the IP allowlist, before authentication (the costliest step: signature checks): if
the request's upstream has its circuit open, or every slot taken and a full queue that this request's
priority cannot jump, the answer is the one the bulkhead or breaker would give later (503
`upstream.overloaded` / `upstream.circuit_open` with Retry-After) without verifying tokens, deciding
authorization or touching Redis. So a flood that openIMIS cannot take costs the mediator little, and an
unauthenticated caller learns only that openIMIS is busy (what the 503 says to anyone). A request that
passes may still be refused later (the queue filled meanwhile): this is a shortcut, not the decision.
Batch Bundles are not shed here: their contract is one answer per entry (mediator/batch.py); nor are
POSTs on channels with async_submission (they may be queued, and the queue accepts while openIMIS is busy).
Reason codes are the bulkhead's and breaker's (`upstream.*`), since the cause is theirs.
"""

from __future__ import annotations

from collections.abc import Mapping

from mediator.bulkhead import REFUSAL_MESSAGES, UpstreamGuard
from mediator.pipeline import Decision, Exchange

ALLOWED = Decision.allowed("load_shed.admitted")


class LoadShedStage:
    name = "load_shed"

    def __init__(self, guards: Mapping[str, UpstreamGuard]) -> None:
        self.guards = guards
        reason, message = REFUSAL_MESSAGES["queue_full"]
        # Built once per upstream: a refusal allocates no decision of its own.
        self._busy = {name: Decision.denied(reason, 503, message,
                                            {"Retry-After": str(guard.bulkhead.config.retry_after_s)})
                      for name, guard in guards.items()}

    async def run(self, exchange: Exchange) -> Decision:
        channel = exchange.channel
        if channel is None or channel.config.serve_from == "replica":
            return ALLOWED  # a replica read may never reach openIMIS
        if exchange.fhir is not None and exchange.fhir.interaction == "batch-or-transaction":
            return ALLOWED  # a batch answers refusals entry by entry (README "Bulk submission")
        if channel.config.async_submission is not None and exchange.request.method == "POST":
            return ALLOWED  # may be queued (README "Queued claims"): accepted even while openIMIS is busy
        config = channel.config
        guard = self.guards.get(config.upstream)
        if guard is None:
            return ALLOWED
        breaker = guard.breaker
        if breaker is not None:
            retry_after = breaker.open_for()
            if retry_after is not None:
                return Decision.denied("upstream.circuit_open", 503, "openIMIS is failing; not contacting it for now",
                                       {"Retry-After": str(retry_after)})
        if guard.bulkhead.sheds(config.priority_value):
            guard.bulkhead.count_refusal("queue_full")
            return self._busy[config.upstream]
        return ALLOWED
