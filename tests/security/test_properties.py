"""Property-based tests (hypothesis) of the two security decisions everything else rests on: the IP
allowlist's set membership and the client-IP resolver. Each property is checked against an independent
brute-force reference written with integer ranges, not with the code under test."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from mediator import addresses as address_module
from mediator.addresses import ClientIpPolicy, CompiledIpSet, IPAddress, IPNetwork, IpSetTable
from mediator.stages import ip_allowlist

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)

ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
ipv6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
# IPv4-mapped IPv6 (::ffff:a.b.c.d) is drawn on purpose: dual-stack sockets report IPv4 callers that way.
ipv4_mapped = st.integers(0, 2**32 - 1).map(lambda n: ipaddress.IPv6Address((0xFFFF << 32) | n))
addresses = st.one_of(ipv4, ipv6, ipv4_mapped)


@st.composite
def networks(draw: st.DrawFn) -> IPNetwork:
    if draw(st.booleans()):
        return ipaddress.IPv4Network((draw(ipv4), draw(st.integers(0, 32))), strict=False)
    return ipaddress.IPv6Network((draw(ipv6), draw(st.integers(0, 128))), strict=False)


def in_range(address: IPAddress, network: IPNetwork) -> bool:
    """Brute-force reference: same family and the integer lies between the network's first and last."""
    return (address.version == network.version
            and int(network.network_address) <= int(address) <= int(network.broadcast_address))


def as_seen(address: IPAddress) -> IPAddress:
    # Documented resolver rule: an IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the IPv4 caller.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@st.composite
def address_near(draw: st.DrawFn, pool: list[IPNetwork]) -> IPAddress:
    """Often an address inside (or at the edge of) one of the networks, so both outcomes are exercised."""
    if pool and draw(st.booleans()):
        network = draw(st.sampled_from(pool))
        edge = draw(st.sampled_from([0, network.num_addresses - 1, draw(st.integers(0, network.num_addresses - 1))]))
        return ipaddress.ip_address(int(network.network_address) + edge) if network.version == 4 \
            else ipaddress.IPv6Address(int(network.network_address) + edge)
    return draw(addresses)


@st.composite
def ip_set_cases(draw: st.DrawFn) -> tuple[list[IPNetwork], list[IPNetwork], IPAddress]:
    allow = draw(st.lists(networks(), max_size=5))
    deny = draw(st.lists(networks(), max_size=3))
    return allow, deny, draw(address_near(allow + deny))


@PROPERTY_SETTINGS
@given(ip_set_cases())
def test_set_membership_equals_brute_force(case: tuple[list[IPNetwork], list[IPNetwork], IPAddress]) -> None:
    allow, deny, address = case
    expected = any(in_range(address, n) for n in allow) and not any(in_range(address, n) for n in deny)
    assert CompiledIpSet(tuple(allow), tuple(deny)).contains(address) == expected


@PROPERTY_SETTINGS
@given(ip_set_cases())
def test_deny_wins_over_any_allow(case: tuple[list[IPNetwork], list[IPNetwork], IPAddress]) -> None:
    allow, deny, address = case
    if any(in_range(address, n) for n in deny):
        assert not CompiledIpSet(tuple(allow + deny), tuple(deny)).contains(address)


@PROPERTY_SETTINGS
@given(st.lists(ip_set_cases(), min_size=1, max_size=4), st.data())
def test_channel_admits_exactly_the_union_of_its_sets(cases: list[tuple[list[IPNetwork], list[IPNetwork],
                                                                        IPAddress]], data: st.DataObject) -> None:
    table = IpSetTable({f"s{i}": CompiledIpSet(tuple(a), tuple(d)) for i, (a, d, _) in enumerate(cases)}, False)
    address = data.draw(st.sampled_from([c[2] for c in cases]))
    chosen = tuple(data.draw(st.lists(st.sampled_from(sorted(table.sets)), unique=True)))
    decision = ip_allowlist.decide(address, chosen, table)
    expected = any(any(in_range(address, n) for n in cases[int(name[1:])][0])
                   and not any(in_range(address, n) for n in cases[int(name[1:])][1]) for name in chosen)
    assert decision.allow == expected
    assert decision.reason == ("ip.allowed" if expected else "ip.denied")


# --- client IP resolver -------------------------------------------------------------------------

def reference_client(chain: list[IPAddress], trusted: list[IPNetwork]) -> IPAddress:
    """chain = X-Forwarded-For entries then the peer, left to right. Walk from the right over trusted hops."""
    for hop in reversed(chain):
        if not any(in_range(as_seen(hop), n) for n in trusted):
            return as_seen(hop)
    return as_seen(chain[0])


@st.composite
def forwarding_cases(draw: st.DrawFn) -> tuple[list[IPNetwork], list[IPAddress]]:
    trusted = draw(st.lists(networks(), max_size=4))
    chain = draw(st.lists(address_near(trusted), min_size=1, max_size=8))
    return trusted, chain


def _policy(trusted: list[IPNetwork], hops: int = 64) -> ClientIpPolicy:
    return ClientIpPolicy(tuple(trusted), hops)


@PROPERTY_SETTINGS
@given(forwarding_cases())
def test_resolver_picks_the_first_untrusted_hop_from_the_right(case: tuple[list[IPNetwork], list[IPAddress]]) -> None:
    trusted, chain = case
    *forwarded, peer = chain
    header = [", ".join(str(a) for a in forwarded)] if forwarded else []
    decision, address = address_module.resolve_client_ip(str(peer), header, _policy(trusted))
    assert decision.allow
    if not any(in_range(as_seen(peer), n) for n in trusted):
        # An untrusted peer's header is never read at all.
        assert address == as_seen(peer)
        return
    assert address == reference_client(chain, trusted)
    untrusted = [i for i, hop in enumerate(chain) if not any(in_range(as_seen(hop), n) for n in trusted)]
    if untrusted:
        # Never an address left of the first untrusted hop (from the right), never a trusted proxy.
        assert address == as_seen(chain[untrusted[-1]])
        assert not any(in_range(address, n) for n in trusted)


header_text = st.text(alphabet=st.sampled_from(list("0123456789abcdef:.,[] %\t;unknown-_/")), max_size=60)


@PROPERTY_SETTINGS
@given(st.one_of(st.none(), header_text, addresses.map(str)), st.lists(header_text, max_size=3),
       st.lists(networks(), max_size=3), st.integers(1, 64))
def test_resolver_never_raises_and_denies_with_a_client_ip_reason(peer: str | None, headers: list[str],
                                                                  trusted: list[IPNetwork], hops: int) -> None:
    decision, address = address_module.resolve_client_ip(peer, headers, _policy(trusted, hops))
    if decision.allow:
        assert address is not None
    else:
        assert address is None and decision.status == 400 and decision.reason.startswith("client_ip.")


@PROPERTY_SETTINGS
@given(forwarding_cases(), st.integers(0, 7), header_text)
def test_garbage_left_of_the_client_is_ignored(case: tuple[list[IPNetwork], list[IPAddress]], at: int,
                                               garbage: str) -> None:
    # Whatever the client writes left of its own address cannot change who it is.
    trusted, chain = case
    *forwarded, peer = chain
    clean = [", ".join(str(a) for a in forwarded)] if forwarded else []
    dirty = [", ".join([garbage.replace(",", "")] + [str(a) for a in forwarded])]
    before, who = address_module.resolve_client_ip(str(peer), clean, _policy(trusted))
    after, who_after = address_module.resolve_client_ip(str(peer), dirty, _policy(trusted))
    if who is not None and any(not any(in_range(as_seen(h), n) for n in trusted) for h in chain):
        assert (after.allow, who_after) == (before.allow, who)
