import ipaddress

import pytest

from mediator.addresses import CompiledIpSet, IpSetTable
from mediator.stages.ip_allowlist import decide
from tests.conftest import channels_yaml, upstream_url


def _net(*cidrs):
    return tuple(ipaddress.ip_network(c) for c in cidrs)


TABLE = IpSetTable(
    {
        "vendor-a": CompiledIpSet(_net("10.1.0.0/16", "2001:db8:a::/48"), _net("10.1.9.0/24")),
        "vendor-b": CompiledIpSet(_net("10.2.0.0/16"), ()),
        "nobody": CompiledIpSet((), ()),
    },
    unlisted_unrestricted=False,
)


@pytest.mark.parametrize(
    ("address", "sets", "allow", "reason"),
    [
        ("10.1.2.3", ("vendor-a",), True, "ip.allowed"),
        ("10.1.9.3", ("vendor-a",), False, "ip.denied"),  # deny wins over allow
        ("10.2.0.1", ("vendor-a",), False, "ip.denied"),
        ("10.2.0.1", ("vendor-a", "vendor-b"), True, "ip.allowed"),
        ("2001:db8:a::1", ("vendor-a",), True, "ip.allowed"),
        ("2001:db8:b::1", ("vendor-a",), False, "ip.denied"),
        ("10.1.2.3", ("nobody",), False, "ip.denied"),
        ("10.1.2.3", (), False, "ip.denied"),  # present and empty: deny all
        ("10.1.2.3", None, False, "ip.channel_has_no_allowlist"),  # absent, policy says deny
    ],
)
def test_allowlist_decisions(address, sets, allow, reason):
    decision = decide(ipaddress.ip_address(address), sets, TABLE)
    assert decision.allow is allow
    assert decision.reason == reason
    if not allow:
        assert decision.status == 403


def test_absent_list_is_unrestricted_only_when_policy_says_so():
    open_table = IpSetTable(TABLE.sets, unlisted_unrestricted=True)
    assert decide(ipaddress.ip_address("192.0.2.1"), None, open_table).reason == "ip.unrestricted"
    assert not decide(ipaddress.ip_address("192.0.2.1"), (), open_table).allow


def test_unknown_address_is_denied():
    assert decide(None, ("vendor-a",), TABLE).reason == "ip.unknown_address"


DENY_LOCAL = """\
version: 1
ip_sets:
  local:
    allow: ["127.0.0.0/8"]
    deny: ["127.0.0.1/32"]
"""


async def test_denied_caller_never_reaches_openimis(sandbox, sandbox_server, make_mediator):
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server)), ip_policy=DENY_LOCAL)
    response = await client.get("/fhir/Medication/")
    assert response.status == 403
    body = await response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "forbidden"
    assert sandbox.requests == []
