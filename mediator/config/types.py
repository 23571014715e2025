"""Reusable validated field types for policy and channel files (the "typedefs" of the schema)."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"


def _to_cidr(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"invalid ip or cidr range: {value!r}")
    try:
        # strict=True: "10.0.0.1/8" is almost always a typo for a host or a network; refuse it.
        return str(ipaddress.ip_network(value.strip(), strict=True))
    except ValueError as exc:
        raise ValueError(f"invalid ip or cidr range: {value!r} ({exc})") from None


def _to_method(value: object) -> str:
    if not isinstance(value, str) or value.upper() not in HTTP_METHODS:
        raise ValueError(f"unknown HTTP method {value!r}; allowed: {', '.join(sorted(HTTP_METHODS))}")
    return value.upper()


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None
    return value


Cidr = Annotated[str, BeforeValidator(_to_cidr)]
HttpMethod = Annotated[str, BeforeValidator(_to_method)]
Regex = Annotated[str, AfterValidator(_check_regex)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
ResourceType = Annotated[str, Field(pattern=r"^[A-Z][A-Za-z]{1,63}$")]
PositiveSeconds = Annotated[float, Field(gt=0, le=3600)]
