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
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from mediator.async_claims.store import QueuedEntry, Result
from mediator.bulkhead import UpstreamRefused
from mediator.fhir import operation_outcome
from mediator.upstream import (
    OpenImisUpstream,
    UpstreamLoginFailed,
    UpstreamReply,
    UpstreamTimeout,
    UpstreamUnavailable,
)

NOT_PROCESSED_STATUSES = frozenset({408, 429, 503})
MAYBE_PROCESSED_STATUSES = frozenset({502, 504})
MAX_LOOKUP_PAGES = 50

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


async def _send(upstream: OpenImisUpstream, method: str, relative: str, query: str, body: bytes | None,
                entry: QueuedEntry, timeout_s: float) -> web.Response:
    url = upstream.upstream_url(relative, query)
    headers = upstream.service_headers(await upstream.token(), entry.client_ip, entry.request_id, body is not None)
    reply = await upstream.send(method, url, headers, body, timeout_s)
    if reply.status == 401 and upstream.config.login is not None:
        # openIMIS processed nothing: logging in again and repeating cannot submit twice.
        headers["Authorization"] = f"Bearer {await upstream.token(force=True)}"
        reply = await upstream.send(method, url, headers, body, timeout_s)
    return _answer(upstream, reply)


def _answer(upstream: OpenImisUpstream, reply: UpstreamReply) -> web.Response:
    return upstream.answer(reply, fhir_json=False)  # stored as JSON; the status URL negotiates its type


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


def patient_of(resource: dict[str, Any]) -> str:
    """The insuree UUID the claim is for (the look-up lists that insuree's recent claims)."""
    patient = resource.get("patient")
    if not isinstance(patient, dict):
        return ""
    reference = patient.get("reference")
    if isinstance(reference, str) and reference.startswith("Patient/"):
        return reference.removeprefix("Patient/")
    identifier = patient.get("identifier")
    if isinstance(identifier, dict) and isinstance(identifier.get("value"), str):
        return str(identifier["value"])
    return ""


def code_of(resource: dict[str, Any]) -> str:
    """The claim code (openIMIS's unique claim identifier): the first identifier value."""
    for identifier in resource.get("identifier") or ():
        if isinstance(identifier, dict) and isinstance(identifier.get("value"), str) and identifier["value"]:
            return str(identifier["value"])
    return ""


def _has_code(resource: Any, code: str) -> bool:
    identifiers = resource.get("identifier") if isinstance(resource, dict) else None
    return any(isinstance(i, dict) and i.get("value") == code for i in identifiers or ())


async def find_claim(upstream: OpenImisUpstream, slot: SlotCall, entry: QueuedEntry, timeout_s: float) -> Lookup:
    """Is the claim already in openIMIS? openIMIS 1.10's `Claim?identifier=` answers 500 for a claim it has
    (its serializer fails), so this lists the insuree's claims since the day before acceptance
    (`Claim?patient=&refDate=`, which works) and looks for the claim code. Found: its ClaimResponse."""
    if not entry.code or not entry.patient:
        return Lookup("failed")
    since = (datetime.fromtimestamp(entry.accepted_at, UTC) - timedelta(days=1)).date().isoformat()
    query = f"patient={entry.patient}&refDate={since}&_count=100"
    try:
        for _ in range(MAX_LOOKUP_PAGES):
            response = await slot(lambda page=query: _send(upstream, "GET", "Claim", page, None, entry, timeout_s))
            if response.status != 200:
                return Lookup("failed")
            bundle = json.loads(_body_text(response))
            for item in bundle.get("entry") or ():
                resource = item.get("resource") if isinstance(item, dict) else None
                if _has_code(resource, entry.code) and isinstance(resource, dict):
                    return await _claim_response(upstream, slot, entry, str(resource.get("id", "")), timeout_s)
            following = [link.get("url", "") for link in bundle.get("link") or ()
                         if isinstance(link, dict) and link.get("relation") == "next"]
            if not following or not urlsplit(following[0]).query:
                return Lookup("absent")
            query = urlsplit(following[0]).query
    except (UpstreamRefused, UpstreamUnavailable, UpstreamTimeout, ValueError, AttributeError):
        return Lookup("failed")
    return Lookup("failed")


async def _claim_response(upstream: OpenImisUpstream, slot: SlotCall, entry: QueuedEntry, claim_id: str,
                          timeout_s: float) -> Lookup:
    if not claim_id:
        return Lookup("failed")
    response = await slot(lambda: _send(upstream, "GET", f"ClaimResponse/{claim_id}", "", None, entry, timeout_s))
    if response.status != 200:
        return Lookup("failed")
    return Lookup("found", result_of(response, "async.found_existing"))


def backoff_s(attempts: int, initial_s: float, max_s: float, rand: Callable[[], float]) -> float:
    """Exponential backoff with full jitter (AWS architecture blog): uniform in [0, min(max, initial·2^n)],
    never below a tenth of initial (so a stampede of retries cannot spin)."""
    ceiling = min(max_s, initial_s * (2 ** min(attempts, 30)))
    return max(initial_s / 10, rand() * ceiling)


def now() -> float:
    return time.time()
