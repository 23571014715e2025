"""Shape limits on request bodies, checked after parsing and before anything is forwarded.

The byte limit (`server.limits.max_body_bytes`) bounds memory but not work: a 1 MiB body can hold a
Bundle of ten thousand entries that openIMIS would process one by one, or arrays nested a hundred
thousand deep that crash recursive parsers (Python's json raises RecursionError; openIMIS's Django REST
framework answers 500). These limits are declared in `server.limits` and enforced here.
"""

from __future__ import annotations

import json
from typing import Any

from mediator.config.models import LimitsConfig
from mediator.pipeline import Decision


def nesting_exceeds(document: Any, limit: int) -> bool:
    """True if objects/arrays nest deeper than `limit` (the top level is depth 1). Iterative: no recursion."""
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def parse_body(body: bytes, limits: LimitsConfig) -> tuple[Any, Decision | None]:
    """Parse a JSON request body within the declared limits: (document, None) or (None, denial)."""
    try:
        document = json.loads(body)
    except RecursionError:
        return None, _too_deep(limits)
    except (ValueError, UnicodeDecodeError):
        return None, Decision.denied("request.malformed_json", 400, "the body is not valid JSON")
    if isinstance(document, dict | list) and nesting_exceeds(document, limits.max_json_depth):
        return None, _too_deep(limits)
    if isinstance(document, dict) and document.get("resourceType") == "Bundle":
        entries = document.get("entry")
        if isinstance(entries, list) and len(entries) > limits.max_bundle_entries:
            return None, Decision.denied("request.too_many_entries", 413,
                                         f"a Bundle may carry at most {limits.max_bundle_entries} entries")
    return document, None


def _too_deep(limits: LimitsConfig) -> Decision:
    return Decision.denied("request.json_too_deep", 400,
                           f"the body nests deeper than {limits.max_json_depth} levels")
