"""Network addresses: parsing, address sets, and the one client-IP resolution (X-Forwarded-For).

Shared building blocks below both `stages/` (client_ip, ip_allowlist, authentication) and `identity/`
(the token endpoint resolves and checks addresses the same way), so neither imports the other's modules.

Client-IP algorithm (aiohttp-remotes XForwardedStrict, RFC 7239 §7.4): start from the socket peer; while
the current hop is a trusted proxy, step to the next X-Forwarded-For entry from the right. The first
untrusted hop is the client. Entries left of it were written by the client and are ignored.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from multidict import CIMultiDictProxy

from mediator.config import Config
from mediator.config.models import IpAllowlistPolicy
from mediator.decision import Decision

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=4096)
def parse_ip(text: str) -> IPAddress:
    """The address a text names (ValueError if none). Addresses are immutable, so the parse of a text seen
    before is reused (bounded, least recently used out): the socket peer is parsed on every request (~9 µs,
    bench issue 18)."""
    return _parse_ip(text)


def _parse_ip(text: str) -> IPAddress:
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


def client_address(peer: str | None, headers: CIMultiDictProxy[str],
                   policy: ClientIpPolicy) -> tuple[Decision, IPAddress | None]:
    """The client address of a request from its socket peer and headers: the only reader of X-Forwarded-For
    (STYLE rule 8), for the client_ip stage and the token endpoint alike."""
    return resolve_client_ip(peer, headers.getall("X-Forwarded-For", []), policy)


def resolve_client_ip(peer: str | None, forwarded_for: Sequence[str],
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


@dataclass(frozen=True, slots=True)
class CompiledIpSet:
    allow: tuple[IPNetwork, ...]
    deny: tuple[IPNetwork, ...]

    def contains(self, address: IPAddress) -> bool:
        return in_networks(address, self.allow) and not in_networks(address, self.deny)


@dataclass(frozen=True, slots=True)
class IpSetTable:
    sets: dict[str, CompiledIpSet]
    unlisted_unrestricted: bool
    _answers: dict[tuple[IPAddress, tuple[str, ...]], bool] = field(default_factory=dict, compare=False, repr=False)
    """`allows` answers already given: a pure function of this (immutable) table, the address and the set
    names; a reload builds a new table. Bounded by _MAX_ANSWERS."""

    @classmethod
    def from_config(cls, config: Config) -> IpSetTable:
        policy = config.policy("ip_allowlist", IpAllowlistPolicy)
        sets = {
            name: CompiledIpSet(tuple(ipaddress.ip_network(c) for c in s.allow),
                                tuple(ipaddress.ip_network(c) for c in s.deny))
            for name, s in policy.ip_sets.items()
        }
        return cls(sets, policy.unlisted_channels == "unrestricted")

    def allows(self, address: IPAddress, set_names: Iterable[str]) -> bool:
        names = tuple(set_names)
        answer = self._answers.get((address, names))
        if answer is None:
            answer = any(self.sets[name].contains(address) for name in names)
            if len(self._answers) < _MAX_ANSWERS:
                self._answers[(address, names)] = answer
        return answer


_MAX_ANSWERS = 4096
