"""The authorization stage when policies/authorization.yaml is absent: every request is denied.

No policy is not "no authorization": without rules nothing checks token scopes, roles or facilities,
so a missing file (deleted, not deployed, a typo in its name) must fail closed, not open. The refusal
is 403 `authorization.no_policy`; a WARNING at start and on every reload says why.
"""

from __future__ import annotations

from mediator.pipeline import Decision, Exchange

REASON = "authorization.no_policy"
MESSAGE = "no authorization policy is configured (policies/authorization.yaml): nothing is allowed"


class NoAuthorizationPolicyStage:
    name = "authorization"

    async def run(self, exchange: Exchange) -> Decision:
        return Decision.denied(REASON, 403, MESSAGE)
