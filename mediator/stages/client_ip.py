"""Stage 1: who is the caller on the network. The only code that reads X-Forwarded-For.

Algorithm (aiohttp-remotes XForwardedStrict, RFC 7239 §7.4): start from the socket peer; while the
current hop is a trusted proxy, step to the next X-Forwarded-For entry from the right. The first
untrusted hop is the client. Entries left of it were written by the client and are ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from mediator.config import Config
from mediator.config.models import IpAllowlistPolicy
from mediator.pipeline import Decision, Exchange

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(text: str) -> IPAddress:
    value = text.strip()
    if value.startswith("[") and value.endswith("]"):  # RFC 7239 style bracketed IPv6
        value = value[1:-1]
    address = ipaddress.ip_address(value)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # ::ffff:10.1.2.3 from a dual-stack socket is the IPv4 caller; match it against IPv4 rules.
        return address.ipv4_mapped
    return address


def in_networks(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    return any(address.version == n.version and address in n for n in networks)


@dataclass(frozen=True, slots=True)
class ClientIpPolicy:
    trusted_proxies: tuple[IPNetwork, ...]
    max_forwarded_hops: int

    @classmethod
    def from_config(cls, config: Config) -> ClientIpPolicy:
        policy = config.policy("ip_allowlist", IpAllowlistPolicy)
        return cls(tuple(ipaddress.ip_network(c) for c in policy.trusted_proxies), policy.max_forwarded_hops)


def decide(peer: str | None, forwarded_for: Sequence[str],
           policy: ClientIpPolicy) -> tuple[Decision, IPAddress | None]:
    """Resolve the client address from the peer and the X-Forwarded-For header values."""
    if not peer:
        return Decision.denied("client_ip.no_peer", 400, "cannot determine the caller's address"), None
    try:
        current = parse_ip(peer)
    except ValueError:
        return Decision.denied("client_ip.no_peer", 400, "cannot determine the caller's address"), None
    if not in_networks(current, policy.trusted_proxies):
        return Decision.allowed("client_ip.peer"), current
    if len(forwarded_for) > 1:
        # Two X-Forwarded-For headers: proxies must fold into one; two means someone injected one.
        return Decision.denied("client_ip.repeated_header", 400,
                               "more than one X-Forwarded-For header"), None
    if not forwarded_for:
        return Decision.allowed("client_ip.peer"), current
    entries = [e.strip() for e in forwarded_for[0].split(",")]
    if len(entries) > policy.max_forwarded_hops:
        return Decision.denied("client_ip.too_many_hops", 400, "too many X-Forwarded-For entries"), None
    for entry in reversed(entries):
        try:
            hop = parse_ip(entry)
        except ValueError:
            return Decision.denied("client_ip.malformed_forwarded_for", 400,
                                   "malformed X-Forwarded-For entry"), None
        current = hop
        if not in_networks(hop, policy.trusted_proxies):
            return Decision.allowed("client_ip.forwarded"), current
    # Every hop is a trusted proxy: the left-most one is as close to the client as we can know.
    return Decision.allowed("client_ip.forwarded"), current


class ClientIpStage:
    name = "client_ip"

    def __init__(self, policy: ClientIpPolicy) -> None:
        self.policy = policy

    async def run(self, exchange: Exchange) -> Decision:
        request = exchange.request
        decision, address = decide(request.remote, request.headers.getall("X-Forwarded-For", []),
                                   self.policy)
        exchange.client_ip = address
        return decision
