"""One delivery attempt of a queued claim to openIMIS, and the look-up that makes a retry safe.

Outcomes (`Attempt.kind`):
* delivered — openIMIS answered 2xx: final.
* refused — openIMIS answered a definitive error (4xx other than 408/429, 500, 501, ...): final, never
  retried. openIMIS answers 500 to claims it rejects (and to a reused claim code), so 500 is definitive.
* retry — nothing can have reached openIMIS (the mediator refused to send: bulkhead/circuit; the
  connection was refused; login failed; openIMIS answered 408/429/503): retried after a backoff.
* unknown — the request may have reached openIMIS (timeout, connection cut, 502/504, unreadable
  answer): retried after a backoff, and only once `find_claim` says the claim is not in openIMIS.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from mediator.async_claims.store import QueuedEntry, Result
from mediator.bulkhead import UpstreamRefused
from mediator.fhir import operation_outcome
from mediator.link_rewrite import rewrite_links
from mediator.upstream import (
    OpenImisUpstream,
    UpstreamLoginFailed,
    UpstreamReply,
    UpstreamTimeout,
    UpstreamUnavailable,
)

NOT_PROCESSED_STATUSES = frozenset({408, 429, 503})
MAYBE_PROCESSED_STATUSES = frozenset({502, 504})

SlotCall = Callable[[Callable[[], Awaitable[web.Response]]], Awaitable[web.Response]]
"""Runs a send inside the upstream's load-protection slot (bulkhead + breaker); see service.upstream_slot."""


@dataclass(frozen=True, slots=True)
class Attempt:
    kind: str
    """delivered | refused | retry | unknown"""
    reason: str
    result: Result | None = None
    retry_after_s: float = 0.0


def _body_text(response: web.Response) -> str:
    return response.body.decode() if isinstance(response.body, bytes) else ""


def result_of(response: web.Response, reason: str) -> Result:
    return Result(response.status, _body_text(response), reason, response.headers.get("Location", ""))


def refusal(status: int, reason: str, message: str) -> Result:
    return Result(status, json.dumps(operation_outcome(status, reason, message), separators=(",", ":")), reason)


async def _exchange(upstream: OpenImisUpstream, method: str, relative: str, query: str, body: bytes | None,
                    entry: QueuedEntry, timeout_s: float) -> UpstreamReply:
    """One request to openIMIS with the mediator's own headers; openIMIS's reply as it came."""
    url = upstream.upstream_url(relative, query)
    headers = upstream.service_headers(entry.client_ip, entry.request_id, body is not None)
    return await upstream.call(method, url, headers, body, timeout_s)   # the one re-login rule


async def _send(upstream: OpenImisUpstream, method: str, relative: str, query: str, body: bytes | None,
                entry: QueuedEntry, timeout_s: float) -> web.Response:
    """As the caller gets it: JSON checked, links rewritten (the same rule as the link_rewrite response
    step), errors as generic OperationOutcomes. Stored as JSON; the status URL negotiates the content type
    when it is read."""
    answered = upstream.answer(await _exchange(upstream, method, relative, query, body, entry, timeout_s),
                               fhir_json=False)
    rewrite_links(upstream.rewriter, answered)   # in place
    return answered


def _nothing_sent(exc: BaseException) -> bool:
    if isinstance(exc, UpstreamRefused | UpstreamLoginFailed):
        return True
    return isinstance(exc, UpstreamUnavailable) and isinstance(exc.__cause__, aiohttp.ClientConnectorError)


async def attempt(upstream: OpenImisUpstream, slot: SlotCall, entry: QueuedEntry, timeout_s: float) -> Attempt:
    """POST the claim once, inside the upstream slot. Never raises for upstream trouble."""
    try:
        response = await slot(lambda: _send(upstream, "POST", entry.resource_type, "", entry.body, entry, timeout_s))
    except UpstreamRefused as exc:
        return Attempt("retry", exc.reason, retry_after_s=float(exc.retry_after_s))
    except UpstreamTimeout:
        return Attempt("unknown", "upstream.timeout")
    except UpstreamUnavailable as exc:
        if _nothing_sent(exc):
            return Attempt("retry", "upstream.login_failed" if isinstance(exc, UpstreamLoginFailed)
                           else "upstream.unreachable")
        return Attempt("unknown", "upstream.unavailable")
    if 200 <= response.status < 300:
        return Attempt("delivered", "async.delivered", result_of(response, "async.delivered"))
    if response.status in NOT_PROCESSED_STATUSES:
        retry_after = response.headers.get("Retry-After", "")
        return Attempt("retry", f"upstream.status_{response.status}",
                       retry_after_s=float(retry_after) if retry_after.isdigit() else 0.0)
    if response.status in MAYBE_PROCESSED_STATUSES:
        return Attempt("unknown", f"upstream.status_{response.status}")
    return Attempt("refused", "async.refused", result_of(response, "async.refused"))


@dataclass(frozen=True, slots=True)
class Lookup:
    kind: str
    """found | absent | failed (could not tell: look again later)"""
    result: Result | None = None


def code_of(resource: dict[str, Any]) -> str:
    """The claim code (openIMIS's unique claim identifier): the first identifier value."""
    for identifier in resource.get("identifier") or ():
        if isinstance(identifier, dict) and isinstance(identifier.get("value"), str) and identifier["value"]:
            return str(identifier["value"])
    return ""


def _uuid_of(resource: dict[str, Any]) -> str:
    for identifier in resource.get("identifier") or ():
        codings = identifier.get("type", {}).get("coding", []) if isinstance(identifier, dict) else []
        if any(isinstance(c, dict) and c.get("code") == "UUID" for c in codings):
            return str(identifier.get("value", ""))
    return ""


def _absent(reply: UpstreamReply) -> bool:
    """openIMIS 1.10 answers a retrieve of an unknown code with 500 "... matching query does not exist"."""
    return reply.status == 404 or reply.status == 500 and b"matching query does not exist" in reply.body


class _Raw:
    """Carries openIMIS's raw reply out of the slot (the slot's send returns a web.Response)."""

    reply: UpstreamReply | None = None


async def find_claim(upstream: OpenImisUpstream, slot: SlotCall, entry: QueuedEntry, timeout_s: float) -> Lookup:
    """Is the claim already in openIMIS? `GET ClaimResponse/<claim code>` (openIMIS retrieves by UUID or by
    code). Not `Claim?identifier=` (its serializer answers 500 for a claim it has) nor a `Claim?patient=`
    listing (openIMIS caches list counts for an hour, so the newest claims fall off the last page).
    Found: the ClaimResponse, read again by its UUID so it is the same document a POST answers."""
    if not entry.code:
        return Lookup("failed")
    path = f"ClaimResponse/{quote(entry.code, safe='')}"
    raw = _Raw()

    async def look() -> web.Response:
        raw.reply = await _exchange(upstream, "GET", path, "", None, entry, timeout_s)
        return web.Response(status=raw.reply.status)  # the breaker counts it like any answer

    try:
        await slot(look)
        if raw.reply is None or _absent(raw.reply):
            return Lookup("absent" if raw.reply is not None else "failed")
        if raw.reply.status != 200:
            return Lookup("failed")
        response = upstream.answer(raw.reply, fhir_json=False)   # a ClaimResponse: no Bundle links to rewrite
        resource = json.loads(_body_text(response))
        if not isinstance(resource, dict) or resource.get("resourceType") != "ClaimResponse":
            return Lookup("failed")
        claim_uuid = _uuid_of(resource)
        if claim_uuid:
            by_uuid = await slot(lambda: _send(upstream, "GET", f"ClaimResponse/{quote(claim_uuid, safe='')}", "",
                                               None, entry, timeout_s))
            if by_uuid.status == 200:
                response = by_uuid
    except (UpstreamRefused, UpstreamUnavailable, UpstreamTimeout, ValueError):
        return Lookup("failed")
    return Lookup("found", result_of(response, "async.found_existing"))


def backoff_s(attempts: int, initial_s: float, max_s: float, rand: Callable[[], float]) -> float:
    """Exponential backoff with full jitter (AWS architecture blog): uniform in [0, min(max, initial·2^n)],
    never below a tenth of initial (so a stampede of retries cannot spin)."""
    ceiling = min(max_s, initial_s * float(2 ** min(attempts, 30)))
    return float(max(initial_s / 10, rand() * ceiling))


def now() -> float:
    return time.time()
