"""Load and validate the whole configuration directory, once: `load_config(root) -> Config`.

A configuration directory holds `channels.yaml` and `policies/*.yaml`. Every problem in every file is
collected and reported as `file:line:col: path: message`; nothing is half-loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from mediator.config.authorization import AuthorizationPolicy
from mediator.config.clients import ClientsPolicy
from mediator.config.models import ChannelConfig, ChannelsFile, IpAllowlistPolicy, ServerConfig, UpstreamConfig
from mediator.config.rate_limits import RateLimitsPolicy, check_limit_channels
from mediator.config.write_profiles import WriteProfilesPolicy
from mediator.config.yaml_source import SourcedDocument, load_yaml
from mediator.errors import ConfigError, ConfigProblem
from mediator.replica.policy import ReplicaPolicy

__all__ = ["Config", "PolicyFile", "load_config", "POLICY_FILES", "validate_document"]

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class PolicyFile:
    """A policy file known to the loader: its name under policies/ and its schema."""

    filename: str
    model: type[BaseModel]
    required: bool = True


# Later stages register their policy files here; the order is the order errors are reported in.
POLICY_FILES: dict[str, PolicyFile] = {
    "ip_allowlist": PolicyFile("ip_allowlist.yaml", IpAllowlistPolicy),
    # Absent: no authorization stage (README "policies/authorization.yaml").
    "authorization": PolicyFile("authorization.yaml", AuthorizationPolicy, required=False),
    # Absent: no client is registered, so channels requiring authentication answer 401.
    "clients": PolicyFile("clients.yaml", ClientsPolicy, required=False),
    # Absent: no rate limits (the rate_limit stage is not built).
    "rate_limits": PolicyFile("rate_limits.yaml", RateLimitsPolicy, required=False),
    # Absent: no master-data replica; channels must not say serve_from: replica.
    "replica": PolicyFile("replica.yaml", ReplicaPolicy, required=False),
    # Absent: every write is refused (write.no_profile), like an absent authorization policy.
    "write_profiles": PolicyFile("write_profiles.yaml", WriteProfilesPolicy, required=False),
}

CrossCheck = Callable[["Config", dict[str, SourcedDocument]], list[ConfigProblem]]
CROSS_CHECKS: list[CrossCheck] = []


@dataclass(frozen=True, slots=True)
class Config:
    root: Path
    channels: ChannelsFile
    policies: dict[str, BaseModel]
    sources: Mapping[str, SourcedDocument] = field(default_factory=dict, compare=False, repr=False)
    """The parsed files with the position of every value (key as in POLICY_FILES, "channels"): for
    `check`'s warnings at file:line:col."""
    channel_indices: tuple[int, ...] | None = field(default=None, compare=False, repr=False)
    """Only while cross-checking a channels.yaml with invalid channels: the position in the file of each
    channel kept. None: channels are as in the file."""

    def indexed_channels(self) -> Iterator[tuple[int, ChannelConfig]]:
        """(index in channels.yaml, channel): what a problem about a channel is reported at."""
        for i, channel in enumerate(self.channels.channels):
            yield (self.channel_indices[i] if self.channel_indices is not None else i), channel

    def policy(self, key: str, model: type[M]) -> M:
        value = self.policies[key]
        if not isinstance(value, model):
            raise TypeError(f"policy {key} is {type(value).__name__}, not {model.__name__}")
        return value


def _message(error: Any) -> str:
    msg = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg


def validate_document(doc: SourcedDocument, model: type[M]) -> tuple[M | None, list[ConfigProblem]]:
    """Validate a parsed YAML document against a schema: the model, or every problem at file:line:col."""
    if doc.data is None:
        return None, [ConfigProblem(doc.file, 1, 1, "file is empty")]
    try:
        return model.model_validate(doc.data), []
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = [p for p in error["loc"] if isinstance(p, str | int)]
            problems.append(doc.problem(loc, _message(error)))
        return None, problems


def _load(path: Path, display: str, model: type[M],
          docs: dict[str, SourcedDocument], key: str) -> tuple[M | None, list[ConfigProblem]]:
    try:
        doc = load_yaml(path, display)
    except ConfigError as exc:
        return None, exc.problems
    docs[key] = doc
    return validate_document(doc, model)


def load_config(root: Path | str) -> Config:
    """Validate every file under `root`; raise ConfigError listing all problems, or return a Config."""
    root = Path(root)
    problems: list[ConfigProblem] = []
    docs: dict[str, SourcedDocument] = {}
    channels, found = _load(root / "channels.yaml", "channels.yaml", ChannelsFile, docs, "channels")
    problems += found
    policies: dict[str, BaseModel] = {}
    for key, spec in POLICY_FILES.items():
        display = f"policies/{spec.filename}"
        path = root / "policies" / spec.filename
        if not path.exists() and not spec.required:
            continue
        model, found = _load(path, display, spec.model, docs, key)
        problems += found
        if model is not None:
            policies[key] = model
    indices: tuple[int, ...] | None = None
    if channels is None and "channels" in docs:
        channels, indices = _valid_parts(docs["channels"])
    if channels is not None:
        # Cross-file checks run even when some file has type errors, over everything that did validate,
        # so one `check` reports every problem of every file (a policy that failed is simply not there).
        config = Config(root, channels, policies, docs, indices)
        for check in CROSS_CHECKS:
            problems += check(config, docs)
        if not problems:
            return Config(root, channels, policies, docs)
    raise ConfigError(problems)


def _valid_parts(doc: SourcedDocument) -> tuple[ChannelsFile | None, tuple[int, ...] | None]:
    """The channels, upstreams and server of a channels.yaml that failed validation, as far as they are
    valid one by one: only for the cross checks (never served). Upstreams that failed still exist by name."""
    data = doc.data
    if not isinstance(data, dict) or not isinstance(data.get("channels"), list):
        return None, None
    upstreams: dict[str, UpstreamConfig] = {}
    for name, raw in (data.get("upstreams") or {}).items() if isinstance(data.get("upstreams"), dict) else ():
        try:
            upstreams[name] = UpstreamConfig.model_validate(raw)
        except ValidationError:
            upstreams[name] = UpstreamConfig.model_construct(base_url="")
    try:
        server = ServerConfig.model_validate(data.get("server") or {})
    except ValidationError:
        return None, None   # the checks need server settings (redis); its own errors are reported
    channels: list[ChannelConfig] = []
    indices: list[int] = []
    for i, raw in enumerate(data["channels"]):
        try:
            channels.append(ChannelConfig.model_validate(raw))
        except ValidationError:
            continue
        indices.append(i)
    partial = ChannelsFile.model_construct(version=1, server=server, upstreams=upstreams, channels=tuple(channels))
    return partial, tuple(indices)


def _channel_references(config: Config, docs: dict[str, SourcedDocument]) -> list[ConfigProblem]:
    """Channel names are unique and every channel's upstream exists: reported at the channel's line."""
    problems = []
    seen: dict[str, int] = {}
    for i, channel in config.indexed_channels():
        if channel.name in seen:
            problems.append(docs["channels"].problem(
                ("channels", i, "name"),
                f"duplicate channel name {channel.name!r} (also channels[{seen[channel.name]}])"))
        seen.setdefault(channel.name, i)
        if channel.upstream not in config.channels.upstreams:
            problems.append(docs["channels"].problem(
                ("channels", i, "upstream"), f"unknown upstream {channel.upstream!r} (not in upstreams)"))
    return problems


CROSS_CHECKS.append(_channel_references)


def _async_submission_needs(config: Config, docs: dict[str, SourcedDocument]) -> list[ConfigProblem]:
    """A queued channel (mediator/async_claims) needs a Redis (the queue must outlive the process) and
    authenticated callers (its status URL answers only the submitting client)."""
    problems = []
    for i, channel in config.indexed_channels():
        if channel.async_submission is None:
            continue
        if config.channels.server.redis is None:
            problems.append(docs["channels"].problem(
                ("channels", i, "async_submission"), f"channel {channel.name!r}: async_submission needs "
                "server.redis (the queue must outlive this process)"))
        if channel.authentication != "required":
            problems.append(docs["channels"].problem(
                ("channels", i, "async_submission"), f"channel {channel.name!r}: async_submission needs "
                "authentication: required (the status URL answers only the submitting client)"))
    return problems


CROSS_CHECKS.append(_async_submission_needs)


def _channel_ip_sets_exist(config: Config, docs: dict[str, SourcedDocument]) -> list[ConfigProblem]:
    ip_policy = config.policies.get("ip_allowlist")
    if not isinstance(ip_policy, IpAllowlistPolicy):
        return []   # the file failed: its own problems are reported
    ip_sets = ip_policy.ip_sets
    problems = []
    for i, channel in config.indexed_channels():
        for j, name in enumerate(channel.ip_allowlist or ()):
            if name not in ip_sets:
                problems.append(docs["channels"].problem(
                    ("channels", i, "ip_allowlist", j),
                    f"unknown ip set {name!r} (not in policies/ip_allowlist.yaml)"))
    return problems


CROSS_CHECKS.append(_channel_ip_sets_exist)


def _authorization_upstream_exists(config: Config, docs: dict[str, SourcedDocument]) -> list[ConfigProblem]:
    policy = config.policies.get("authorization")
    if not isinstance(policy, AuthorizationPolicy):
        return []
    name = policy.facility_directory.upstream
    if name in config.channels.upstreams:
        return []
    return [docs["authorization"].problem(("facility_directory", "upstream"),
                                          f"unknown upstream {name!r} (not in channels.yaml upstreams)")]


CROSS_CHECKS.append(_authorization_upstream_exists)
def _client_ip_sets_exist(config: Config, docs: dict[str, SourcedDocument]) -> list[ConfigProblem]:
    ip_policy = config.policies.get("ip_allowlist")
    if "clients" not in config.policies or not isinstance(ip_policy, IpAllowlistPolicy):
        return []
    ip_sets = ip_policy.ip_sets
    clients = config.policy("clients", ClientsPolicy).clients
    return [docs["clients"].problem(("clients", client_id, "ip_allowlist", j),
                                    f"unknown ip set {name!r} (not in policies/ip_allowlist.yaml)")
            for client_id, client in clients.items()
            for j, name in enumerate(client.ip_allowlist) if name not in ip_sets]


CROSS_CHECKS.append(_client_ip_sets_exist)
CROSS_CHECKS.append(check_limit_channels)


def _replica_references(config: Config, docs: dict[str, SourcedDocument]) -> list[ConfigProblem]:
    replica = config.policies.get("replica")
    problems = []
    if isinstance(replica, ReplicaPolicy):
        if replica.upstream not in config.channels.upstreams:
            problems.append(docs["replica"].problem(("upstream",), f"unknown upstream {replica.upstream!r} "
                                                                   "(not in channels.yaml upstreams)"))
        if replica.store == "redis" and config.channels.server.redis is None:
            problems.append(docs["replica"].problem(("store",), "store redis needs server.redis in channels.yaml"))
    for i, channel in config.indexed_channels():
        if channel.serve_from == "replica" and replica is None and "replica" not in docs:
            problems.append(docs["channels"].problem(("channels", i, "serve_from"),
                                                     "serve_from replica needs policies/replica.yaml"))
    return problems


CROSS_CHECKS.append(_replica_references)


def _write_profiles_present(config: Config, docs: dict[str, SourcedDocument]) -> list[ConfigProblem]:
    """Facility bindings and contained rules resolve through the facility directory, which
    authorization.yaml declares (README "Write firewall")."""
    profiles = config.policies.get("write_profiles")
    if isinstance(profiles, WriteProfilesPolicy) and profiles.needs_directory() \
            and "authorization" not in config.policies and "authorization" not in docs:
        # (in docs but not in policies: the file is there and failed; its own problems are reported)
        return [docs["write_profiles"].problem(("profiles",), "facility: caller and contained rules need "
                                               "policies/authorization.yaml (its facility_directory)")]
    return []


CROSS_CHECKS.append(_write_profiles_present)
