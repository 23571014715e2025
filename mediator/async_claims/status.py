"""`GET <base>_async/<channel>/<id>`: the status URL of a queued submission.

The network, authentication and rate-limit stages of the channel the URL names run first (client IP, ip
allowlist, authentication, over_limit, rate_limit), **before the job is read**: a caller the channel
refuses costs no Redis read and learns nothing, not even whether the store is up. Then the job must have
come through that channel, and it is shown only to its submitting client, and only to a caller bound to
every health facility the submitter was bound to (the submitting user's facility's users); anyone else,
and an unknown or expired id, gets the same 404 async.not_found.

`GET <base>_async/<id>` (the form issued before the channel was in the URL, answered while such jobs may
still be retained, e.g. in a rolling upgrade): guarded by the first async channel; a job of another
channel must then pass that channel's network and authentication stages as well.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from mediator.async_claims.service import AsyncClaims, status_error
from mediator.config.models import ChannelConfig
from mediator.fhir import operation_outcome_response
from mediator.logs import JsonEvent
from mediator.pipeline import Decision, Exchange, Principal, Stage, request_id_for
from mediator.redis_store import STORE_ERRORS
from mediator.request_view import RequestView
from mediator.stages.channel_match import Channel

access_log = logging.getLogger("mediator.access")

GUARD_STAGES = ("client_ip", "ip", "authentication", "over_limit", "rate_limit")
"""The stages of the URL's channel a status request goes through (those the runtime built): the network
checks, authentication and the channel's rate limits (a poll counts 1, like any request on it)."""
IDENTITY_STAGES = GUARD_STAGES[:3]
"""Those a job of another channel reached through the earlier URL form passes as well (no second charge)."""


def may_see(principal: Principal | None, job: Any) -> bool:
    if principal is None or principal.client_id != job.client:
        return False
    if job.facilities:
        return bool(job.facilities <= principal.health_facilities)
    return not principal.health_facilities  # submitted facility-less: only facility-less callers


def _not_found() -> web.Response:
    return operation_outcome_response(404, "async.not_found", "no such submission")


RuntimeParts = Callable[[web.Request], tuple[AsyncClaims | None, tuple[Stage, ...]]]


def make_status_handler(parts: RuntimeParts) -> Callable[[web.Request], Any]:
    async def handle_status(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        service, stages = parts(request)
        exchange = Exchange(RequestView.from_aiohttp(request), request_id_for(request))
        response = await _answer(request, exchange, service, stages)
        response.headers["X-Request-ID"] = exchange.request_id
        response.headers.update(exchange.response_headers)   # RateLimit of an admitted poll
        reason = exchange.decisions[-1][1].reason if exchange.decisions else "none"
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(JsonEvent({"request_id": exchange.request_id, "client_ip": str(exchange.client_ip),
                                       "method": request.method, "channel": "async-status",
                                       "interaction": "async-status", "resource_type": None,
                                       "status": response.status, "reason": reason,
                                       "ms": round((time.perf_counter() - started) * 1000, 2)}))
        return response

    return handle_status


async def _answer(request: web.Request, exchange: Exchange, service: AsyncClaims | None,
                  stages: tuple[Stage, ...]) -> web.Response:
    if service is None:
        exchange.decisions.append(("async", Decision.denied("async.not_found", 404, "")))
        return _not_found()
    named = request.match_info.get("channel")
    config = service.status_channel(named)
    by_name = {s.name: s for s in stages}
    refused = await _guard(exchange, config, by_name, GUARD_STAGES)
    if refused is not None:
        return refused
    job_id = request.match_info.get("job_id", "")
    try:
        job = await service.job_for(job_id) if job_id.isalnum() and len(job_id) == 32 else None
    except STORE_ERRORS as exc:
        exchange.decisions.append(("async", Decision.denied("async.store_unavailable", 503, "")))
        return status_error(exc)
    if job is not None and named is not None and job.channel != named:
        job = None  # the URL names another channel than the job came through: not this URL's job
    elif job is not None and named is None and job.channel != config.name:
        refused = await _guard(exchange, service.status_channel(job.channel), by_name, IDENTITY_STAGES)
        if refused is not None:
            return refused
    if job is None or not may_see(exchange.principal, job):
        exchange.decisions.append(("async", Decision.denied("async.not_found", 404, "")))
        return _not_found()
    exchange.decisions.append(("async", Decision.allowed(f"async.{job.state}")))
    return service.status_response(exchange.request, job)


async def _guard(exchange: Exchange, config: ChannelConfig, by_name: dict[str, Stage],
                 names: tuple[str, ...]) -> web.Response | None:
    """Run the stages `names` (those the runtime built) as on channel `config`: the first refusal's answer."""
    exchange.channel = Channel(config, re.compile(config.path))
    for name in names:
        stage = by_name.get(name)
        if stage is None:
            continue
        decision = await stage.run(exchange)
        exchange.decisions.append((name, decision))
        if not decision.allow:
            return operation_outcome_response(decision.status, decision.reason, decision.message, decision.headers)
    return None
