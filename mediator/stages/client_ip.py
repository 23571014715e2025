"""Stage 1: who is the caller on the network. The resolution (`client_address`, the only reader of
X-Forwarded-For) is in mediator.addresses, shared with the token endpoint.
"""

from __future__ import annotations

from mediator.addresses import ClientIpPolicy, client_address
from mediator.pipeline import Decision, Exchange


class ClientIpStage:
    name = "client_ip"

    def __init__(self, policy: ClientIpPolicy) -> None:
        self.policy = policy

    async def run(self, exchange: Exchange) -> Decision:
        request = exchange.request
        decision, address = client_address(request.remote, request.headers, self.policy)
        exchange.client_ip = address
        return decision
