"""Which search parameters each resource type really supports, and the one rule for the others.

The tables are read from openIMIS 1.10's viewsets (api_fhir_r4/views/fhir/*.py: what each `list()`
reads from `request.GET`, plus `_lastUpdated` of ValidityFromRequestParameterFilter and the paginator's
`_count` / `page-offset`) and from the replica's own search (mediator.replica.serve). openIMIS
silently ignores every other parameter and answers as if it were absent; FHIR (R4 search §3.1.1.1,
`Prefer: handling`) says a server either refuses it (strict) or ignores it and says so (lenient).

`decide` is pure; `SearchParameterStage` applies it: a refused search never reaches openIMIS, an
accepted one is forwarded with only the parameters used (`Exchange.search.upstream_query`), so openIMIS's
self link lists exactly those (FHIR's way of reporting what was ignored), and `_count` is capped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote_plus

from multidict import MultiDict

from mediator.config import Config
from mediator.config.authorization import AuthorizationPolicy
from mediator.config.models import ChannelConfig
from mediator.fhir import prefer_tokens
from mediator.pipeline import Decision, Exchange
from mediator.replica.policy import ReplicaPolicy

NAME = "search"

# Answered by the mediator itself (the answer's media type), never forwarded.
MEDIATOR_PARAMETERS = frozenset({"_format"})
PAGING = frozenset({"_count", "page-offset"})
RESULT_PARAMETERS = PAGING | {"_offset"}
"""Paging, not filters (not listed as searchParam in the CapabilityStatement)."""
_LAST_UPDATED = frozenset({"_lastUpdated"})

# Claim and ClaimResponse searches are answered by the authorization stage's facility-scoped search
# (stages/authorization_search.py PARAMS, which imports nothing from here; a test keeps the two equal).
SCOPED_SEARCH_PARAMETERS: Mapping[str, frozenset[str]] = {
    "Claim": frozenset({"_count", "_offset", "page-offset", "patient", "identifier", "contained"}),
    "ClaimResponse": frozenset({"_count", "_offset", "page-offset", "identifier"}),
}

# openIMIS 1.10 (api_fhir_r4/views/fhir): parameters each list() honours. `identifier` / `code` make it
# answer one bare resource (a retrieve), not a Bundle.
OPENIMIS_SEARCH_PARAMETERS: Mapping[str, frozenset[str]] = {
    "Patient": PAGING | _LAST_UPDATED | {"identifier", "refDate", "claimDateFrom"},
    # Claim, ClaimResponse: the scoped search's (from openIMIS's claim index), not openIMIS's list's.
    "Claim": SCOPED_SEARCH_PARAMETERS["Claim"],
    "ClaimResponse": SCOPED_SEARCH_PARAMETERS["ClaimResponse"],
    "ActivityDefinition": PAGING | _LAST_UPDATED,     # no identifier/code search in openIMIS
    "Medication": PAGING | _LAST_UPDATED | {"identifier"},
    "Location": PAGING | _LAST_UPDATED | {"identifier", "physicalType"},
    "InsurancePlan": PAGING | _LAST_UPDATED | {"identifier"},
    "Organization": PAGING | _LAST_UPDATED | {"code", "type", "resourceType"},
    "Practitioner": PAGING | _LAST_UPDATED | {"code", "resourceType"},
    "PractitionerRole": PAGING | _LAST_UPDATED | {"code", "resourceType"},
}
# Parameters that make openIMIS answer a single bare resource instead of a searchset.
OPENIMIS_SINGLE_RESULT = {"Patient": "identifier", "Claim": "identifier", "Medication": "identifier",
                          "Location": "identifier", "InsurancePlan": "identifier", "Organization": "code",
                          "Practitioner": "code", "PractitionerRole": "code"}

REPLICA_SEARCH_PARAMETERS = PAGING | _LAST_UPDATED | {"identifier", "code", "name", "name:contains"}


def supported_parameters(resource_type: str, channel: ChannelConfig, replica: ReplicaPolicy | None) -> frozenset[str]:
    """What a search of `resource_type` through `channel` honours (besides _format)."""
    if channel.serve_from == "replica" and replica is not None and resource_type in replica.served_types:
        if resource_type in ("CodeSystem", "ValueSet"):
            return frozenset()
        return REPLICA_SEARCH_PARAMETERS
    return OPENIMIS_SEARCH_PARAMETERS.get(resource_type, PAGING)


@dataclass(frozen=True, slots=True)
class SearchRequest:
    """A search as the mediator answers it: what is used, what was ignored."""

    used: tuple[tuple[str, str], ...]
    """Parameters used (decoded), in the caller's order, `_count` as capped."""
    upstream_query: str
    """The raw query string forwarded: the caller's bytes of the used parameters."""
    ignored: tuple[str, ...] = ()
    """Names of parameters ignored under handling=lenient."""
    count_asked: int | None = None
    """The caller's `_count` when it was reduced to max_count."""

    @property
    def query(self) -> MultiDict[str]:
        return MultiDict(self.used)


def decide(raw_query: str, supported: frozenset[str], handling: str, max_count: int, *,
           count_only: bool = False) -> Decision | SearchRequest:
    """The rule: unsupported or malformed parameters → 400 under strict, dropped under lenient.
    `count_only`: `_count=0` (the total, no entries) is answered; openIMIS's paginator cannot (it
    reads 0 as "the default page size"), so there it counts as malformed."""
    used: list[tuple[str, str]] = []
    kept_raw: list[str] = []
    ignored: list[str] = []
    count_asked: int | None = None
    for piece in raw_query.split("&") if raw_query else ():
        if not piece:
            continue
        raw_key, _, raw_value = piece.partition("=")
        key, value = unquote_plus(raw_key), unquote_plus(raw_value)
        if key in MEDIATOR_PARAMETERS:
            continue
        if key not in supported:
            if handling == "strict":
                return Decision.denied(f"{NAME}.unsupported_parameter", 400,
                                       f"unsupported search parameter {key[:64]!r}; supported: "
                                       + ", ".join(sorted(supported)))
            ignored.append(key)
            continue
        if key in RESULT_PARAMETERS:
            number = _positive_int(value, zero=(count_only and key == "_count") or key == "_offset")
            if number is None:
                if handling == "strict":
                    return Decision.denied(f"{NAME}.invalid_parameter", 400, f"{key} must be a positive integer")
                ignored.append(key)
                continue
            if key == "_count" and number > max_count:
                count_asked, value = number, str(max_count)
                piece = f"{raw_key}={max_count}"
        used.append((key, value))
        kept_raw.append(piece)
    return SearchRequest(tuple(used), "&".join(kept_raw), tuple(ignored), count_asked)


def _positive_int(value: str, *, zero: bool = False) -> int | None:
    if not value.isdigit() or len(value) > 9:
        return None
    number = int(value)
    return number if number > 0 or (zero and number == 0) else None


def handling_for(exchange: Exchange, default: str) -> str:
    wanted = prefer_tokens(exchange.request).get("handling")
    return wanted if wanted in ("strict", "lenient") else default


class SearchParameterStage:
    """Pipeline stage "search": applies `decide` to GET/HEAD searches; annotates `exchange.search`."""

    name = NAME

    def __init__(self, replica: ReplicaPolicy | None, scoped_max_count: int | None = None) -> None:
        self.replica = replica
        self.scoped_max_count = scoped_max_count
        """authorization's search_results.max_page_size: the largest page a scoped search serves."""

    @classmethod
    def from_config(cls, config: Config) -> SearchParameterStage:
        replica = config.policies.get("replica")
        authorization = config.policies.get("authorization")
        return cls(replica if isinstance(replica, ReplicaPolicy) else None,
                   authorization.search_results.max_page_size if isinstance(authorization, AuthorizationPolicy)
                   else None)

    async def run(self, exchange: Exchange) -> Decision:
        fhir, channel = exchange.fhir, exchange.channel
        assert fhir is not None and channel is not None  # the channel stage allowed the request
        if fhir.interaction != "search-type" or exchange.request.method not in ("GET", "HEAD") or \
                fhir.resource_type is None:
            return Decision.allowed(f"{NAME}.not_a_search")
        answers = channel.config.fhir_answers
        supported = supported_parameters(fhir.resource_type, channel.config, self.replica)
        scoped = fhir.resource_type in SCOPED_SEARCH_PARAMETERS and supported is not REPLICA_SEARCH_PARAMETERS
        max_count = min(answers.max_count, self.scoped_max_count) if scoped and self.scoped_max_count \
            else answers.max_count
        verdict = decide(exchange.request.rel_url.raw_query_string, supported,
                         handling_for(exchange, answers.handling), max_count,
                         count_only=supported is REPLICA_SEARCH_PARAMETERS or scoped)
        if isinstance(verdict, Decision):
            return verdict
        exchange.search = verdict
        if verdict.ignored or verdict.count_asked is not None:
            # Names are the caller's text: counted, never logged (query strings never are).
            return Decision.allowed(f"{NAME}.parameters_ignored", f"{len(verdict.ignored)} ignored")
        return Decision.allowed(f"{NAME}.accepted")
