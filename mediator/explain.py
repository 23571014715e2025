"""`openimis-mediator explain`: run the live pipeline stages on a described request and say why.

The request is built offline (aiohttp's make_mocked_request) and goes through the same `build_stages`
the server uses, so the reasons printed are the reasons the live mediator gives. Two differences, both
printed: the described principal stands in for the authentication stage (explain has no token to
verify), and nothing is forwarded to openIMIS (lookups that authorization needs — the facility
directory, a ClaimResponse's owning Claim — do go to openIMIS, with the mediator's own login, as live).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from mediator.config import Config
from mediator.pipeline import Decision, Exchange, Pipeline, Principal, Stage
from mediator.stages import ORDER, build_stages
from mediator.upstream import OpenImisUpstream
from mediator.write_profiles import WriteCheck

_PRINCIPAL_FIELDS = {"client_id", "auth_method", "user_id", "roles", "scopes", "health_facilities", "claims"}


class DescribedPrincipal:
    """Explain-only stand-in for the authentication stage: sets the principal it was given."""

    name = "authentication"

    def __init__(self, principal: Principal | None) -> None:
        self.principal = principal

    async def run(self, exchange: Exchange) -> Decision:
        exchange.principal = self.principal
        return Decision.allowed("authentication.described", "explain: the described principal, not verified")


def principal_from(document: Mapping[str, Any]) -> Principal:
    """A Principal from a JSON object with Principal's field names (README "explain")."""
    unknown = set(document) - _PRINCIPAL_FIELDS
    if unknown:
        raise ValueError(f"unknown principal fields: {', '.join(sorted(unknown))}")
    if not isinstance(document.get("client_id"), str):
        raise ValueError("client_id (a string) is required")
    return Principal(
        client_id=document["client_id"], auth_method=str(document.get("auth_method", "access_token")),
        user_id=document.get("user_id"), roles=frozenset(document.get("roles") or ()),
        scopes=frozenset(document.get("scopes") or ()),
        health_facilities=frozenset(document.get("health_facilities") or ()),
        claims=dict(document.get("claims") or {}))


class _Peer:
    """The transport of a mocked request, reporting the described client address."""

    def __init__(self, ip: str) -> None:
        self._ip = ip

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return (self._ip, 50000)
        return default

    def is_closing(self) -> bool:
        return False


@dataclass(slots=True)
class Explanation:
    decisions: list[tuple[str, Decision]]
    authz: dict[str, Any] = field(default_factory=dict)
    final: Decision | None = None
    write_check: WriteCheck | None = None

    @property
    def reasons(self) -> list[tuple[str, str]]:
        return [(stage, d.reason) for stage, d in self.decisions]

    def lines(self) -> list[str]:
        out = []
        for stage, decision in self.decisions:
            verdict = "allow" if decision.allow else f"deny {decision.status}"
            line = f"{stage:<15} {verdict:<9} {decision.reason}"
            if stage == "authorization":
                line += f"  rule={self.authz.get('rule') or '-'}"
                if self.authz.get("target_facilities"):
                    line += f"  facilities={','.join(self.authz['target_facilities'])}"
                if self.authz.get("filtered"):
                    line += "  (search results filtered to the caller's facilities)"
                if "shadow" in self.authz:
                    shadow = self.authz["shadow"]
                    line += f"  shadow: rule={shadow['rule']} would {shadow['decision']} ({shadow['reason']})"
            if stage == "write" and self.write_check is not None:
                line += f"  rule={self.write_check.rule or '-'}"
                if self.write_check.element is not None:
                    line += f"  element={self.write_check.element}"
            if decision.message:
                line += f"  -- {decision.message}"
            out.append(line)
            for entry in self.authz.get("entries", []) if stage == "authorization" else ():
                out.append(f"{'':<15} entry {entry['index']}: {entry['reason']} rule={entry['rule'] or '-'}")
        if self.final is None:
            out.append("result: allowed; the live mediator would forward this request to openIMIS")
        else:
            out.append(f"result: {self.final.status} {self.final.reason}")
        return out


def _with_described_principal(stages: Sequence[Stage], principal: Principal | None) -> list[Stage]:
    stand_in = DescribedPrincipal(principal)
    result = [s for s in stages if s.name != "authentication"]
    position = ORDER.index("authentication")
    index = next((i for i, s in enumerate(result) if ORDER.index(s.name) > position), len(result))
    result.insert(index, stand_in)
    return result


async def explain(config: Config, method: str, path: str, principal: Principal | None, *,
                  body: bytes | None = None, client_ip: str = "127.0.0.1",
                  headers: Mapping[str, str] | None = None) -> Explanation:
    server = config.channels.server
    upstreams = {name: OpenImisUpstream(name, u, server.public_base_url)
                 for name, u in config.channels.upstreams.items()}
    for upstream in upstreams.values():
        await upstream.start()
    try:
        stages = _with_described_principal(build_stages(config, upstreams, CollectorRegistry()), principal)
        request_headers = CIMultiDict(headers or {})
        if body is not None and "Content-Type" not in request_headers:
            request_headers["Content-Type"] = "application/fhir+json"
        request = make_mocked_request(method.upper(), path, headers=request_headers, transport=_Peer(client_ip))
        exchange = Exchange(request, "explain", _body=body if body is not None else b"")
        final = await Pipeline(stages).run(exchange)
        return Explanation(exchange.decisions, dict(exchange.attributes.get("authz", {})), final,
                           exchange.write_check)
    finally:
        for upstream in upstreams.values():
            await upstream.close()


def described_principal(claims_file: str | None, client: str | None, roles: str | None,
                        facilities: str | None, user: str | None, scopes: str | None,
                        auth_method: str) -> Principal | None:
    if claims_file is not None:
        return principal_from(json.loads(Path(claims_file).read_text()))
    if client is None:
        return None

    def split(text: str | None) -> frozenset[str]:
        return frozenset(p for p in (text or "").replace(",", " ").split() if p)
    return Principal(client, auth_method, user_id=user, roles=split(roles), scopes=split(scopes),
                     health_facilities=split(facilities))
