"""Bulk submission: a FHIR batch Bundle POSTed to the base becomes one upstream create per entry.

openIMIS has no batch endpoint, so the mediator splits the Bundle (hl7.org/fhir/R4/http.html#transaction)
and answers a `batch-response` Bundle with one `response.status` per entry, in entry order. Each entry
goes through the per-entry checks (authorization's hook), idempotency and the upstream bulkhead, like a
single POST would. A `transaction` is refused (400 batch.transaction_unsupported): the mediator cannot
make openIMIS apply several creates atomically. Entries other than POST <allowed type>: per-entry 400.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web

from mediator.bulkhead import UpstreamRefused
from mediator.config.models import ChannelConfig
from mediator.fhir import (
    FHIR_JSON,
    PLAIN_JSON,
    FhirRequest,
    MalformedRequest,
    created_id,
    operation_outcome,
    operation_outcome_response,
    parse_fhir_path,
    wants_fhir_json,
)
from mediator.metrics import Metrics
from mediator.pipeline import Exchange
from mediator.upstream import ParsedResponse, UpstreamTimeout, UpstreamUnavailable, response_document


@dataclass(frozen=True, slots=True)
class BatchEntry:
    """One entry of a batch, as far as the mediator understood it. `fhir` is None if the url is unusable."""

    index: int
    method: str
    url: str
    fhir: FhirRequest | None
    resource: dict[str, Any] | None


CreateEntry = Callable[[BatchEntry], Awaitable[web.Response]]


def _status_text(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _entry(status: int, reason: str | None = None, message: str = "",
           resource: dict[str, Any] | None = None, location: str | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"status": _status_text(status)}
    if location:
        response["location"] = location
    if reason is not None:
        response["outcome"] = operation_outcome(status, reason, message)
    elif resource is not None and resource.get("resourceType") == "OperationOutcome":
        response["outcome"] = resource
        resource = None
    entry: dict[str, Any] = {"response": response}
    if resource is not None:
        entry["resource"] = resource
    return entry


def parse_entry(index: int, raw: Any) -> BatchEntry:
    request = raw.get("request") if isinstance(raw, dict) else None
    method = request.get("method") if isinstance(request, dict) else None
    url = request.get("url") if isinstance(request, dict) else None
    resource = raw.get("resource") if isinstance(raw, dict) else None
    fhir = None
    if isinstance(method, str) and isinstance(url, str) and "?" not in url and "://" not in url:
        try:
            fhir = parse_fhir_path(method, url)
        except MalformedRequest:
            fhir = None
    return BatchEntry(index, method if isinstance(method, str) else "", url if isinstance(url, str) else "",
                      fhir, resource if isinstance(resource, dict) else None)


def _refusal(entry: BatchEntry, channel: ChannelConfig) -> dict[str, Any] | None:
    batch = channel.batch
    assert batch is not None
    fhir = entry.fhir
    if fhir is None or fhir.interaction != "create" or fhir.resource_type not in batch.resource_types:
        return _entry(400, "batch.entry_unsupported",
                      f"only POST of {', '.join(batch.resource_types)} is supported in a batch")
    if entry.resource is None or entry.resource.get("resourceType") != fhir.resource_type:
        return _entry(400, "batch.entry_invalid", "the entry's resource does not match request.url")
    return None


async def _answer(response: web.Response, resource_type: str) -> dict[str, Any]:
    resource = response_document(response)
    document = resource if isinstance(resource, dict) else None
    return _entry(response.status, resource=document,
                  location=response.headers.get("Location") or _created_location(response.status, resource_type,
                                                                                   document))


def _created_location(status: int, resource_type: str, document: dict[str, Any] | None) -> str | None:
    """`entry.response.location` of a create openIMIS answered without a Location (it never sends one): the
    created resource's relative URL (FHIR R4 http.html#transaction-response)."""
    rid = created_id(resource_type, document) if status == 201 else None
    return f"{resource_type}/{rid}" if rid is not None else None


async def run_batch(exchange: Exchange, channel: ChannelConfig, document: dict[str, Any],
                    create: CreateEntry, metrics: Metrics | None = None) -> web.Response:
    batch = channel.batch
    if batch is None:
        return operation_outcome_response(400, "batch.not_enabled", "this channel does not accept batches")
    if document.get("resourceType") != "Bundle":
        return operation_outcome_response(400, "batch.not_a_bundle", "POST to the base takes a batch Bundle")
    if document.get("type") == "transaction":
        return operation_outcome_response(400, "batch.transaction_unsupported",
                                          "openIMIS cannot apply a transaction atomically; send type batch")
    if document.get("type") != "batch":
        return operation_outcome_response(400, "batch.not_a_batch", "Bundle.type must be batch")
    raw_entries = document.get("entry") or []
    if not isinstance(raw_entries, list):
        return operation_outcome_response(400, "batch.not_a_batch", "Bundle.entry must be a list")
    if len(raw_entries) > batch.max_entries:
        return operation_outcome_response(413, "batch.too_many_entries",
                                          f"at most {batch.max_entries} entries per batch")
    parallel = asyncio.Semaphore(batch.parallel)

    async def one(index: int, raw: Any) -> dict[str, Any]:
        entry = parse_entry(index, raw)
        refusal = _refusal(entry, channel)
        if refusal is not None:
            return refusal
        async with parallel:
            try:
                assert entry.fhir is not None and entry.fhir.resource_type is not None   # _refusal checked it
                return await _answer(await create(entry), entry.fhir.resource_type)
            except (UpstreamRefused, UpstreamTimeout, UpstreamUnavailable) as exc:
                failed = exc.decision()   # the entry ends as the whole request would (mediator.errors)
                return _entry(failed.status, failed.reason, failed.message)

    entries = await asyncio.gather(*(one(i, raw) for i, raw in enumerate(raw_entries)))
    if metrics is not None:
        for entry in entries:
            metrics.batch_entries.labels(channel.name, entry["response"]["status"].split()[0]).inc()
    bundle = {"resourceType": "Bundle", "type": "batch-response", "entry": entries}
    content_type = FHIR_JSON if wants_fhir_json(exchange.request) else PLAIN_JSON
    # Handed on parsed: the response steps read the batch-response without parsing it again.
    body = json.dumps(bundle, separators=(",", ":"), ensure_ascii=False).encode()
    return ParsedResponse(bundle, status=200, body=body, content_type=content_type, charset="utf-8")
