"""Stage 3: is the caller's address allowed on this channel.

A channel lists ip set names; the caller must be *in* one of them (an allow entry matches and no
deny entry of that set does: deny wins). Absent list: `unlisted_channels` decides. Empty list: deny.
The same engine (`IpSetTable.allows`) serves per-client allowlists in the authentication stage.
"""

from __future__ import annotations

from mediator.addresses import IPAddress, IpSetTable
from mediator.pipeline import Decision, Exchange


def decide(address: IPAddress | None, channel_sets: tuple[str, ...] | None, table: IpSetTable) -> Decision:
    if address is None:
        return Decision.denied("ip.unknown_address", 403, "caller address unknown")
    if channel_sets is None:
        if table.unlisted_unrestricted:
            return Decision.allowed("ip.unrestricted")
        return Decision.denied("ip.channel_has_no_allowlist", 403, "this channel admits no addresses")
    if table.allows(address, channel_sets):
        return Decision.allowed("ip.allowed")
    return Decision.denied("ip.denied", 403, "caller address is not allowed on this channel")


class IpAllowlistStage:
    name = "ip"

    def __init__(self, table: IpSetTable) -> None:
        self.table = table

    async def run(self, exchange: Exchange) -> Decision:
        channel = exchange.channel
        sets = channel.config.ip_allowlist if channel is not None else ()
        return decide(exchange.client_ip, sets, self.table)
