"""`openimis-mediator explain`: run the live pipeline stages on a described request and say why.

The request goes through `mediator.offline.evaluate`: the same `build_stages` the server uses, with the
described principal standing in for the authentication stage and in-memory stores, so explain never
changes shared state (no rate-limit counter in Redis, no replay store entry, no signing key written).
Nothing is forwarded to openIMIS. The lookups authorization needs (the facility directory, a
claim's owner from the claim index, by uuid or code) are answered from `--facts FILE` (the policy-test
facts format, fully offline) or, without it, asked of openIMIS with the mediator's own login, as live
(read-only: directory GETs, claim-index queries). An allowed facility-scoped search is reported as such:
the live mediator answers it from the caller's claims, which is not evaluated offline.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mediator.config import Config
from mediator.offline import AssumedFacts, DescribedRequest, Explanation, evaluate
from mediator.pipeline import Principal

_PRINCIPAL_FIELDS = {"client_id", "auth_method", "user_id", "roles", "scopes", "health_facilities", "claims"}


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


async def explain(config: Config, method: str, path: str, principal: Principal | None, *,
                  body: bytes | None = None, client_ip: str = "127.0.0.1",
                  headers: Mapping[str, str] | None = None, facts: AssumedFacts | None = None) -> Explanation:
    request = DescribedRequest(method.upper(), path, dict(headers or {}), body, client_ip)
    return await evaluate(config, request, principal, facts)


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


__all__ = ["Explanation", "described_principal", "explain", "principal_from"]
