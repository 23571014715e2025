"""The request stage: read and parse a request body once, within its limits, before anything judges it.

Every later stage (authorization, the write firewall, rate-limit cost, idempotency, the batch splitter,
forwarding) reads `exchange.body` (a `ParsedBody`) and never parses again, so they all judge one and
the same document, and openIMIS receives the bytes that document was parsed from.

Limits, in the order they apply (README "channels.yaml" `server.limits`):
* size: `max_body_bytes`, from Content-Length before reading and while reading (413), and the whole
  body within `body_read_timeout_s` (408); both raised by `Exchange.read_body` and answered by the app;
* depth: `max_json_depth`, measured by a linear scan of the text before the recursive decoder runs, so
  a body nested deeper than Python's recursion limit is a 400, never a RecursionError;
* Bundle entries: `max_bundle_entries` (413), checked on the parsed document before any stage sees it.
Python's json accepts bodies openIMIS's parser reads differently or that hide a second meaning; those are
refused: other encodings than UTF-8 and duplicate object keys (the last one wins, silently).
"""

from __future__ import annotations

import json
from itertools import accumulate
from typing import Any

from mediator.config import Config
from mediator.config.models import LimitsConfig
from mediator.fhir import ACCEPTED_BODY_TYPES
from mediator.pipeline import Decision, Exchange, ParsedBody

NAME = "request"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

_BRACKETS_ONLY = bytes(c for c in range(256) if c not in b"[]{}")
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


class _DuplicateKey(ValueError):
    pass


def nesting_depth_exceeds(text: str, limit: int) -> bool:
    """True if objects/arrays in the JSON `text` nest deeper than `limit` (the top level is depth 1).

    Linear, no recursion, C-speed string operations: escaped backslashes and escaped quotes are removed
    (backslashes pair off left to right, as JSON reads them), so every quote left delimits a string;
    the text between strings is the structure, whose brackets are counted. Malformed text gives some
    answer and is refused by the decoder anyway."""
    unescaped = text.replace("\\\\", "").replace('\\"', "")
    structure = "".join(unescaped.split('"')[::2]).encode().translate(None, _BRACKETS_ONLY)
    if len(structure) <= limit:
        return False
    return max(accumulate(map(_DEPTH_STEP.__getitem__, structure))) > limit


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def parse_json(raw: bytes, limits: LimitsConfig) -> tuple[Any, Decision | None]:
    """(document, None) or (None, denial). Pure."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, Decision.denied(f"{NAME}.malformed_json", 400, "the body is not UTF-8 JSON")
    if nesting_depth_exceeds(text, limits.max_json_depth):
        return None, Decision.denied(f"{NAME}.json_too_deep", 400,
                                     f"the body nests deeper than {limits.max_json_depth} levels")
    try:
        document = json.loads(text, object_pairs_hook=_object)
    except _DuplicateKey as exc:
        return None, Decision.denied(f"{NAME}.duplicate_key", 400,
                                     f"the body repeats the key {str(exc)[:64]!r} in one object")
    except RecursionError:   # cannot happen below the depth limit; never a 500 if it does
        return None, Decision.denied(f"{NAME}.json_too_deep", 400, "the body nests too deeply")
    except ValueError:
        return None, Decision.denied(f"{NAME}.malformed_json", 400, "the body is not valid JSON")
    if isinstance(document, dict) and document.get("resourceType") == "Bundle":
        entries = document.get("entry")
        if isinstance(entries, list) and len(entries) > limits.max_bundle_entries:
            return None, Decision.denied(f"{NAME}.too_many_entries", 413,
                                         f"a Bundle may carry at most {limits.max_bundle_entries} entries")
    return document, None


def check_resource(exchange: Exchange, document: Any) -> Decision | None:
    """The body is a FHIR resource and agrees with the URL (type on create/update, id on update)."""
    if not isinstance(document, dict) or not isinstance(document.get("resourceType"), str):
        return Decision.denied(f"{NAME}.not_a_resource", 400, "the body is not a FHIR resource")
    fhir = exchange.fhir
    if fhir is not None and fhir.interaction in ("create", "update") and \
            document["resourceType"] != fhir.resource_type:
        return Decision.denied(f"{NAME}.resource_type_mismatch", 400,
                               "the body's resourceType does not match the URL")
    if fhir is not None and fhir.interaction == "update" and document.get("id") != fhir.resource_id:
        return Decision.denied(f"{NAME}.id_mismatch", 400, "the body's id does not match the URL")
    return None


class RequestBodyStage:
    """Pipeline stage "request". Sets `exchange.body` for POST/PUT/PATCH; other methods carry no body."""

    name = NAME

    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits

    @classmethod
    def from_config(cls, config: Config) -> RequestBodyStage:
        return cls(config.channels.server.limits)

    async def run(self, exchange: Exchange) -> Decision:
        if exchange.request.method not in BODY_METHODS:
            return Decision.allowed(f"{NAME}.no_body")
        if exchange.request.content_type not in ACCEPTED_BODY_TYPES:
            return Decision.denied(f"{NAME}.unsupported_media_type", 415,
                                   "send application/fhir+json or application/json")
        raw = await exchange.read_body(self.limits.max_body_bytes)   # 413 / 408 raised, answered by the app
        document, refusal = parse_json(raw, self.limits)
        if refusal is not None:
            return refusal
        refusal = check_resource(exchange, document)
        if refusal is not None:
            return refusal
        exchange.body = ParsedBody(raw, document)
        return Decision.allowed(f"{NAME}.parsed")
