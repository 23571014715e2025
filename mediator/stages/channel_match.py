"""Stage 2: which channel (OpenHIM vocabulary) handles this request; annotates, forwards nothing.

Also refuses what openIMIS must never receive: malformed FHIR paths (400), methods no channel
allows (405), and writes to protected resources (403) unless the channel explicitly allows them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from mediator.config import Config
from mediator.config.models import ChannelConfig
from mediator.config.types import HTTP_METHODS
from mediator.fhir import FhirRequest, MalformedRequest, check_raw_path, parse_fhir_path
from mediator.pipeline import Decision, Exchange

WRITE_METHODS = frozenset({"PUT", "PATCH", "DELETE"})


@dataclass(frozen=True, slots=True)
class Channel:
    config: ChannelConfig
    path: re.Pattern[str]

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True, slots=True)
class ChannelTable:
    prefix: str
    """Path prefix of the public FHIR base, e.g. "/fhir/"."""
    channels: tuple[Channel, ...]
    protected_resources: frozenset[str]

    @classmethod
    def from_config(cls, config: Config) -> ChannelTable:
        server = config.channels.server
        channels = tuple(Channel(c, re.compile(c.path)) for c in config.channels.channels)
        return cls(urlsplit(server.public_base_url).path, channels, frozenset(server.protected_resources))


@dataclass(frozen=True, slots=True)
class Match:
    decision: Decision
    channel: Channel | None = None
    fhir: FhirRequest | None = None


def decide(method: str, raw_path: str, path: str, table: ChannelTable) -> Match:
    if method not in HTTP_METHODS:
        # TRACE, CONNECT and invented verbs are not FHIR; refuse before looking any further.
        return Match(Decision.denied("channel.method_not_allowed", 405, f"{method[:16]} is not allowed"))
    try:
        check_raw_path(raw_path)
    except MalformedRequest as exc:
        return Match(Decision.denied("channel.malformed_path", 400, str(exc)))
    if not (path + "/").startswith(table.prefix):
        return Match(Decision.denied("channel.none", 404, "no channel serves this path"))
    relative = path[len(table.prefix):]
    if relative.strip("/") == "metadata" and method not in ("GET", "HEAD"):
        # The CapabilityStatement is read-only (FHIR capabilities interaction): 405 with what is allowed.
        routed = {m for c in table.channels if c.path.fullmatch(path) for m in c.config.methods}
        allowed = sorted(routed & {"GET", "HEAD"})
        return Match(Decision.denied("channel.method_not_allowed", 405, f"{method} is not allowed on metadata",
                                     {"Allow": ", ".join(allowed or ["GET"])}))
    try:
        fhir = parse_fhir_path(method, relative)
    except MalformedRequest as exc:
        return Match(Decision.denied("channel.malformed_path", 400, str(exc)))
    path_matched: list[Channel] = []
    for channel in table.channels:
        if channel.path.fullmatch(path):
            if method in channel.config.methods:
                return _protected(method, fhir, channel, table)
            path_matched.append(channel)
    if path_matched:
        allow = _allow_header(path_matched)
        return Match(Decision.denied("channel.method_not_allowed", 405,
                                     f"{method} is not allowed here", {"Allow": allow}), fhir=fhir)
    return Match(Decision.denied("channel.none", 404, "no channel serves this path"), fhir=fhir)


def _protected(method: str, fhir: FhirRequest, channel: Channel, table: ChannelTable) -> Match:
    if (method in WRITE_METHODS and fhir.resource_type in table.protected_resources
            and not channel.config.allow_protected_writes):
        return Match(Decision.denied("channel.protected_resource", 403,
                                     f"{method} on {fhir.resource_type} is not allowed through the mediator"),
                     channel, fhir)
    return Match(Decision.allowed("channel.matched", channel.name), channel, fhir)


def _allow_header(channels: Sequence[Channel]) -> str:
    methods = sorted({m for c in channels for m in c.config.methods})
    return ", ".join(methods)


class ChannelMatchStage:
    name = "channel"

    def __init__(self, table: ChannelTable) -> None:
        self.table = table

    async def run(self, exchange: Exchange) -> Decision:
        request = exchange.request
        match = decide(request.method, request.raw_path, request.path, self.table)
        exchange.channel = match.channel
        exchange.fhir = match.fhir
        return match.decision
