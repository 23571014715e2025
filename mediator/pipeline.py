"""The request pipeline: decisions as values, the per-request exchange, and the stage runner.

A stage looks at the Exchange and returns a Decision. The runner stops at the first denial; one
renderer (`mediator.fhir.operation_outcome_response`) turns it into a FHIR OperationOutcome. Stages
never raise denials and never write responses.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from aiohttp import web

from mediator.decision import Decision as Decision  # re-exported: mediator.pipeline.Decision
from mediator.errors import MediatorError
from mediator.request_view import RequestView

if TYPE_CHECKING:
    from mediator.fhir import FhirRequest
    from mediator.search_parameters import SearchRequest
    from mediator.stages.channel_match import Channel
    from mediator.write_profiles import WriteCheck

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as proven by the authentication stage. The contract later stages rely on.

    `client_id` is the registered HMS application; `user_id`, `roles` and `health_facilities` come from
    the verified SSO user token (or the client's registry defaults); `scopes` are SMART-style
    permissions granted to this request. Health facilities are openIMIS HF codes (e.g. "JMHOS001").
    """

    client_id: str
    auth_method: str
    """mtls | private_key_jwt | access_token | trusted_header"""
    user_id: str | None = None
    roles: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    health_facilities: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = field(default_factory=lambda: _NO_HEADERS)
    """Other verified, non-secret claims (never the token itself)."""
    vouched_by: str | None = None
    """Who vouches for `user_id`: `iss=<issuer>` (an SSO user token) or `client=<client_id>` (a trusted
    header). None with a user id: the client (explain, tests)."""
    _user_key: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Built once: rate limits, authorization facts, the audit event and logs each read it, and the
        # percent-encoding cost ~12 µs per read (bench, issue 18).
        if self.user_id is not None:
            object.__setattr__(self, "_user_key",
                               user_key(self.vouched_by or f"client={self.client_id}", self.user_id))

    @property
    def user_key(self) -> str | None:
        """The user as a key (rate limits, audit, logs): see `user_key`."""
        return self._user_key


@functools.lru_cache(maxsize=4096)
def user_key(vouched_by: str, user_id: str) -> str:
    """The one construction of a user key: the user id namespaced by the issuer or client that vouches
    for it. Two vouching parties naming the same user id are two users (vendor B's trusted header naming
    one of A's users must not exhaust, or appear as, A's user). Both parts are percent-encoded, so no
    user id can forge another namespace with separators of its own."""
    return f"{quote(vouched_by, safe='=')}/user={quote(user_id, safe='')}"


@dataclass(slots=True)
class AuthorizationFacts:
    """What the authorization stage decided and on what (audit, explain). Never tokens, claims or bodies."""

    decision: str
    """allow | deny"""
    reason: str
    rule: str | None
    client: str | None
    user: str | None
    """Principal.user_key: namespaced by who vouches for the user."""
    caller_facilities: list[str]
    resource_type: str | None
    resource_id: str | None
    target_facilities: list[str]
    filtered: bool
    shadow: dict[str, str] | None = None
    """A shadow rule's verdict: {rule, decision, reason}."""
    entries: list[dict[str, Any]] = field(default_factory=list)
    """A Bundle's entries, one verdict each."""
    foreign_entries: int = 0
    """Entries of a forwarded search answer a shadow facility rule would have removed."""

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (explain, policy tests): optional parts only when present."""
        record: dict[str, Any] = {
            "decision": self.decision, "reason": self.reason, "rule": self.rule, "client": self.client,
            "user": self.user, "caller_facilities": self.caller_facilities, "resource_type": self.resource_type,
            "resource_id": self.resource_id, "target_facilities": self.target_facilities, "filtered": self.filtered}
        if self.shadow is not None:
            record["shadow"] = self.shadow
        if self.entries:
            record["entries"] = self.entries
        if self.foreign_entries:
            record["foreign_entries"] = self.foreign_entries
        return record


@dataclass(frozen=True, slots=True)
class ParsedBody:
    """A request body as the request stage read and parsed it, once (stages/request_body.py).

    `raw` is what is forwarded to openIMIS; `document` is what every stage judged. They are the same
    JSON: UTF-8 only, no duplicate keys, so openIMIS's parser (Python's json, via Django REST framework)
    reads exactly the document the mediator checked.
    """

    raw: bytes
    document: dict[str, Any]

    @property
    def resource_type(self) -> str:
        return str(self.document["resourceType"])


class BodyTooLarge(MediatorError):
    """The body is larger than server.limits.max_body_bytes (413)."""

    reason = "request.body_too_large"
    status = 413
    public_message = "the request body is larger than allowed"


class BodyReadTimeout(MediatorError):
    """The body did not arrive within server.limits.body_read_timeout_s (408)."""

    reason = "request.body_timeout"
    status = 408
    public_message = "the request body did not arrive in time"
    close_connection = True  # the rest of a slow body must not be read as the next request


@dataclass(slots=True)
class Exchange:
    """What the pipeline knows about one request so far. Created per request; not shared."""

    request: RequestView
    """The request as received, parsed once by the adapter (the HTTP handler, or offline evaluation)."""
    request_id: str
    client_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    fhir: FhirRequest | None = None
    channel: Channel | None = None
    principal: Principal | None = None
    search: SearchRequest | None = None
    """A GET search as the search stage accepted it (parameters used and ignored); None otherwise."""
    decisions: list[tuple[str, Decision]] = field(default_factory=list)
    authorization_facts: AuthorizationFacts | None = None
    """What authorization decided and on what (rule, facilities, entries): for explain and policy tests."""
    facility: str | None = None
    """The one health facility authorization resolved the request to (its target), if exactly one."""
    response_filters: list[ResponseFilter] = field(default_factory=list)
    """Checks of openIMIS's answer a stage registered (the chain's `response_filters` step runs them)."""
    response_headers: dict[str, str] = field(default_factory=dict)
    """Headers a stage asked for on the final answer (RateLimit on admitted requests)."""
    _body: bytes | None = None
    body: ParsedBody | None = None
    """The parsed request body (POST/PUT/PATCH), set by the request stage; None before it or without a body."""
    write_check: WriteCheck | None = None
    """What the write firewall decided and on which element (for audit and explain)."""
    body_read_timeout_s: float | None = None
    """Deadline for reading the whole body (None: unbounded; the app sets server.limits.body_read_timeout_s)."""
    upstream_cost: int = 1
    """How many openIMIS requests this request may cause; the rate limit charges this (authorization
    declares 2 for reads and searches of facility-bound types: an ownership or index lookup + the read)."""
    charged_before_lookup: bool = False
    """The lookup_charge stage charged it to the rate limit already (the rate_limit stage does not)."""
    upstream_path: str | None = None
    """The FHIR path sent to openIMIS when it is not the client's (a Claim read by code goes by uuid)."""
    answered_by: str | None = None
    """The route step that answered (mediator.chain.ROUTE), for the response steps."""
    served_by: LocalAnswer | None = None
    """Set by a stage that answers the request itself (facility-scoped searches) instead of forwarding it."""

    async def read_body(self, max_bytes: int) -> bytes:
        """The request body, read once, never more than max_bytes (else BodyTooLarge)."""
        if self._body is None:
            declared = self.request.content_length
            if declared is not None and declared > max_bytes:
                raise BodyTooLarge()
            try:
                async with asyncio.timeout(self.body_read_timeout_s):
                    self._body = await self._read(max_bytes)
            except TimeoutError:
                raise BodyReadTimeout() from None
        return self._body

    async def _read(self, max_bytes: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        if self.request.body is None:
            return b""
        async for chunk in self.request.body:
            size += len(chunk)
            if size > max_bytes:
                raise BodyTooLarge()
            chunks.append(chunk)
        return b"".join(chunks)


class LocalAnswer(Protocol):
    """An answer built by the mediator from its own openIMIS requests (each inside the upstream's guard)."""

    async def run(self, request: RequestView, client_ip: str, request_id: str, priority: int,
                  timeout_s: float) -> web.Response: ...


ResponseFilter = Callable[["Exchange", web.StreamResponse], Awaitable[web.StreamResponse]]


class Stage(Protocol):
    """A pipeline stage. `name` is the reason-code prefix and the metrics label."""

    name: str

    async def run(self, exchange: Exchange) -> Decision: ...


class DecisionRecorder(Protocol):
    def record(self, stage: str, decision: Decision) -> None: ...


class Pipeline:
    """Runs stages in their declared order; the first denial ends the request."""

    def __init__(self, stages: Sequence[Stage], recorder: DecisionRecorder | None = None) -> None:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique: {names}")
        self.stages = tuple(stages)
        self._recorder = recorder

    async def run(self, exchange: Exchange) -> Decision | None:
        for stage in self.stages:
            decision = await stage.run(exchange)
            exchange.decisions.append((stage.name, decision))
            if self._recorder is not None:
                self._recorder.record(stage.name, decision)
            if not decision.allow:
                return decision
        return None


_REQUEST_ID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def request_id_for(request: web.Request) -> str:
    """Reuse a caller's X-Request-ID if it is short and plain (it ends up in logs), else make one."""
    given = request.headers.get("X-Request-ID", "")
    if 8 <= len(given) <= 64 and set(given) <= _REQUEST_ID_OK:
        return given
    # 128 random bits as 32 hex digits, like uuid4().hex, without building a UUID object (~5 µs, issue 18).
    return os.urandom(16).hex()

