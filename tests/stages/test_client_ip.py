import ipaddress

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mediator.addresses import ClientIpPolicy
from mediator.addresses import resolve_client_ip as decide
from tests.conftest import channels_yaml, upstream_url

PROXIES = ClientIpPolicy((ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("fd00::/64")), 5)


@pytest.mark.parametrize(
    ("peer", "xff", "reason", "client"),
    [
        ("203.0.113.9", [], "client_ip.peer", "203.0.113.9"),
        # An untrusted peer's X-Forwarded-For is never read.
        ("203.0.113.9", ["198.51.100.1"], "client_ip.peer", "203.0.113.9"),
        ("10.0.0.2", [], "client_ip.peer", "10.0.0.2"),
        ("10.0.0.2", ["198.51.100.7"], "client_ip.forwarded", "198.51.100.7"),
        # Spoofed left-most entry: the client wrote "1.1.1.1", our proxy appended the real address.
        ("10.0.0.2", ["1.1.1.1, 198.51.100.7"], "client_ip.forwarded", "198.51.100.7"),
        # Two trusted hops, then the client.
        ("10.0.0.2", ["6.6.6.6, 198.51.100.7, 10.0.0.3"], "client_ip.forwarded", "198.51.100.7"),
        # All hops trusted: the left-most one.
        ("10.0.0.2", ["10.0.0.5, 10.0.0.3"], "client_ip.forwarded", "10.0.0.5"),
        ("fd00::1", ["2001:db8::7"], "client_ip.forwarded", "2001:db8::7"),
        ("fd00::1", ["[2001:db8::8]"], "client_ip.forwarded", "2001:db8::8"),
        # IPv4-mapped IPv6 peers are matched as IPv4.
        ("::ffff:10.0.0.2", ["198.51.100.7"], "client_ip.forwarded", "198.51.100.7"),
        ("::ffff:203.0.113.9", [], "client_ip.peer", "203.0.113.9"),
    ],
)
def test_client_address_resolution(peer, xff, reason, client):
    decision, address = decide(peer, xff, PROXIES)
    assert decision.allow
    assert decision.reason == reason
    assert str(address) == client


@pytest.mark.parametrize(
    ("peer", "xff", "reason"),
    [
        ("10.0.0.2", ["1.1.1.1", "2.2.2.2"], "client_ip.repeated_header"),
        ("10.0.0.2", ["not-an-ip"], "client_ip.malformed_forwarded_for"),
        ("10.0.0.2", ["1.1.1.1, 10.0.0.3, "], "client_ip.malformed_forwarded_for"),
        ("10.0.0.2", [", ".join(["10.0.0.9"] * 6)], "client_ip.too_many_hops"),
        (None, [], "client_ip.no_peer"),
        ("garbage", [], "client_ip.no_peer"),
    ],
)
def test_bad_forwarding_is_400(peer, xff, reason):
    decision, address = decide(peer, xff, PROXIES)
    assert not decision.allow
    assert decision.status == 400
    assert decision.reason == reason
    assert address is None


def test_garbage_after_untrusted_hop_is_never_parsed():
    # Only hops right of the first untrusted one are examined; junk to the left is the client's.
    decision, address = decide("10.0.0.2", ["junk, 198.51.100.7"], PROXIES)
    assert decision.allow and str(address) == "198.51.100.7"


ONLY_198 = """\
version: 1
trusted_proxies: ["127.0.0.1/32"]
ip_sets:
  local:
    allow: ["198.51.100.0/24"]
"""


async def test_spoofed_forwarded_for_over_a_socket(sandbox_server, make_mediator):
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server)), ip_policy=ONLY_198)
    # The test client is our trusted proxy (127.0.0.1); the real client is 203.0.113.5.
    spoofed = await client.get("/fhir/Medication/", headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.5"})
    assert spoofed.status == 403
    assert (await spoofed.json())["issue"][0]["details"]["coding"][0]["code"] == "ip.denied"
    honest = await client.get("/fhir/Medication/", headers={"X-Forwarded-For": "198.51.100.1"})
    assert honest.status == 200
    repeated = await client.get("/fhir/Medication/", headers=[("X-Forwarded-For", "198.51.100.1"),
                                                              ("X-Forwarded-For", "198.51.100.2")])
    assert repeated.status == 400


async def test_ipv6_peer_over_a_socket(sandbox_server, tmp_path):
    from mediator.app import build_app
    from mediator.config import load_config
    from tests.conftest import write_config

    policy = 'version: 1\nip_sets:\n  local:\n    allow: ["::1/128"]\n'
    root = write_config(tmp_path, channels_yaml(upstream_url(sandbox_server)), policy)
    server = TestServer(build_app(load_config(root)), host="::1")
    async with TestClient(server) as client:
        response = await client.get("/fhir/Medication/")
        assert response.status == 200
    v4_only = 'version: 1\nip_sets:\n  local:\n    allow: ["127.0.0.0/8"]\n'
    root = write_config(tmp_path / "v4", channels_yaml(upstream_url(sandbox_server)), v4_only)
    server = TestServer(build_app(load_config(root)), host="::1")
    async with TestClient(server) as client:
        response = await client.get("/fhir/Medication/")
        assert response.status == 403


def test_nothing_else_reads_forwarding_headers():
    # STYLE rule 8: the resolver is the only code that reads X-Forwarded-For or Forwarded.
    import re
    from pathlib import Path

    import mediator

    reading = re.compile(r"""headers\.(get|getall|getone)\(\s*["'](x-forwarded-for|forwarded)["']""", re.I)
    readers = sorted(p.name for p in Path(mediator.__file__).parent.rglob("*.py") if reading.search(p.read_text()))
    assert readers == ["addresses.py"]
