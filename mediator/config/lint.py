"""Warnings about a configuration that is valid but cannot do what it says (`openimis-mediator check`).

Each warning is a `ConfigProblem` at the file:line:col of the value concerned, its message starting with
`warning:`. They do not stop `serve` or a reload (exit 0 from `check`; exit 2 under `check --strict`):

* an environment variable the configuration names is not set (openIMIS login, Redis password, replay store);
* a role of an authorization rule that no client can carry: not in any enabled client's `default_roles`,
  and no enabled client accepts user tokens (whose roles claim could carry it); a rule none of whose roles
  can be carried can never match; a rule of `user/` permissions only whose roles no client vouching for
  users carries can never match either;
* a permission that no channel routes (no channel passes that method on that resource type), so it can
  never match;
* a channel no client can reach: its ip_allowlist admits nobody, no enabled client's networks overlap it,
  or no authorization rule grants any request it routes;
* policies/authorization.yaml absent (everything is denied), policies/write_profiles.yaml absent (every
  write is refused).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Sequence

from mediator.config import Config
from mediator.config.authorization import ANONYMOUS, AuthorizationPolicy, Permission
from mediator.config.clients import ClientEntry, ClientsPolicy
from mediator.config.models import ChannelConfig, IpAllowlistPolicy
from mediator.config.types import IPNetwork
from mediator.config.yaml_source import SourcedDocument
from mediator.errors import ConfigProblem

SAMPLE_ID = "x1"
"""The id of the sample instance requests used to ask whether a channel routes a permission."""


def _warning(doc: SourcedDocument | None, file: str, path: Sequence[str | int], message: str) -> ConfigProblem:
    if doc is None:
        return ConfigProblem(file, 1, 1, f"warning: {message}")
    problem = doc.problem(path, message)
    return ConfigProblem(problem.file, problem.line, problem.column, f"warning: {problem.message}")


def config_warnings(config: Config, environ: dict[str, str] | None = None) -> list[ConfigProblem]:
    env = environ if environ is not None else dict(os.environ)
    absent = [] if "write_profiles" in config.policies else [ConfigProblem(
        "policies/write_profiles.yaml", 1, 1, "warning: the file is absent: every write is refused (write.no_profile)")]
    return [*_environment(config, env), *_rules(config), *absent, *_channels(config)]


def named_environment_variables(config: Config) -> list[tuple[str, tuple[str | int, ...], str, str]]:
    """(source key, key path, variable, what needs it) for every environment variable the config names."""
    found: list[tuple[str, tuple[str | int, ...], str, str]] = []
    for name, upstream in config.channels.upstreams.items():
        login = upstream.login
        if login is None:
            continue
        if login.username_env:
            found.append(("channels", ("upstreams", name, "login", "username_env"), login.username_env,
                          f"the openIMIS login of upstream {name}"))
        found.append(("channels", ("upstreams", name, "login", "password_env"), login.password_env,
                      f"the openIMIS login of upstream {name}"))
    redis = config.channels.server.redis
    if redis is not None and redis.password_env:
        found.append(("channels", ("server", "redis", "password_env"), redis.password_env, "the Redis password"))
    clients = config.policies.get("clients")
    if isinstance(clients, ClientsPolicy) and clients.token_service.replay_store.redis_url_env:
        found.append(("clients", ("token_service", "replay_store", "redis_url_env"),
                      clients.token_service.replay_store.redis_url_env, "the token replay store"))
    return found


def _environment(config: Config, env: dict[str, str]) -> list[ConfigProblem]:
    out = []
    for key, path, variable, purpose in named_environment_variables(config):
        if env.get(variable):
            continue
        file = "channels.yaml" if key == "channels" else f"policies/{key}.yaml"
        out.append(_warning(config.sources.get(key), file, path,
                            f"environment variable {variable} is not set ({purpose} needs it)"))
    return out


def _enabled_clients(config: Config) -> dict[str, ClientEntry]:
    policy = config.policies.get("clients")
    if not isinstance(policy, ClientsPolicy):
        return {}
    return {name: entry for name, entry in policy.clients.items() if entry.enabled}


def _open_channels(config: Config) -> bool:
    return any(c.authentication == "none" for c in config.channels.channels)


def _requests_for(permission: Permission) -> list[tuple[str, str]]:
    """Sample (method, path relative to the FHIR base) requests this permission could grant."""
    if permission.resource_type == "*":
        return []
    if permission.resource_type == "CapabilityStatement":
        return [("GET", "metadata")] if "r" in permission.letters else []
    base = permission.resource_type
    by_letter = {"r": ("GET", f"{base}/{SAMPLE_ID}"), "s": ("GET", base), "c": ("POST", base),
                 "u": ("PUT", f"{base}/{SAMPLE_ID}"), "d": ("DELETE", f"{base}/{SAMPLE_ID}")}
    return [by_letter[letter] for letter in "cruds" if letter in permission.letters]


def _routing_channels(config: Config, permission: Permission) -> set[str]:
    """Names of the channels that would pass a request this permission grants (batch entries included)."""
    from mediator.stages.channel_match import ChannelTable, decide

    table = ChannelTable.from_config(config)
    found: set[str] = set()
    for method, relative in _requests_for(permission):
        path = table.prefix + relative
        match = decide(method, path, path, table)
        if match.decision.allow and match.channel is not None:
            found.add(match.channel.name)
    batch = decide("POST", table.prefix, table.prefix, table)   # a batch Bundle POSTed to the base
    if "c" in permission.letters and batch.decision.allow and batch.channel is not None and \
            batch.channel.config.batch is not None and \
            permission.resource_type in batch.channel.config.batch.resource_types:
        found.add(batch.channel.name)
    return found


def _rules(config: Config) -> list[ConfigProblem]:
    policy = config.policies.get("authorization")
    if not isinstance(policy, AuthorizationPolicy):
        return [ConfigProblem("policies/authorization.yaml", 1, 1, "warning: the file is absent: every request "
                              "is denied (authorization.no_policy)")]
    doc = config.sources.get("authorization")
    file = "policies/authorization.yaml"
    clients = _enabled_clients(config)
    any_role = any(entry.user_token is not None for entry in clients.values())
    carried = {role for entry in clients.values() for role in entry.default_roles}
    if _open_channels(config):
        carried.add(ANONYMOUS)
    with_user = {role for entry in clients.values() if entry.user_token is not None or entry.trust_user_header
                 for role in entry.default_roles}
    out: list[ConfigProblem] = []
    for i, rule in enumerate(policy.rules):
        uncarried = [] if any_role else [j for j, role in enumerate(rule.roles) if role not in carried]
        for j in uncarried:
            out.append(_warning(doc, file, ("rules", i, "roles", j),
                                f"role {rule.roles[j]!r} is in no enabled client's default_roles and no client "
                                "accepts user tokens that could carry it"))
        if rule.roles and len(uncarried) == len(rule.roles):
            out.append(_warning(doc, file, ("rules", i, "name"),
                                f"rule {rule.name!r} can never match: no caller can carry any of its roles"))
            continue
        if not any_role and all(p.context == "user" for p in rule.permissions) and \
                not any(role in with_user for role in rule.roles):
            out.append(_warning(doc, file, ("rules", i, "name"),
                                f"rule {rule.name!r} can never match: its user/ permissions need a user, and no "
                                "client that carries its roles vouches for users"))
            continue
        for j, permission in enumerate(rule.permissions):
            if _requests_for(permission) and not _routing_channels(config, permission):
                out.append(_warning(doc, file, ("rules", i, "permissions", j),
                                    f"{permission.text} can never match: no channel routes "
                                    f"{_describe(_requests_for(permission))}"))
    return out


def _describe(requests: Iterable[tuple[str, str]]) -> str:
    return " or ".join(f"{method} /{path.replace(SAMPLE_ID, '<id>')}" for method, path in requests)


def _networks(names: Iterable[str], ip_policy: IpAllowlistPolicy) -> list[IPNetwork]:
    return [ipaddress.ip_network(c) for name in names if name in ip_policy.ip_sets
            for c in ip_policy.ip_sets[name].allow]


def _channels(config: Config) -> list[ConfigProblem]:
    doc = config.sources.get("channels")
    ip_policy = config.policies.get("ip_allowlist")
    if not isinstance(ip_policy, IpAllowlistPolicy):
        return []
    clients = _enabled_clients(config)
    reached = _channels_granted(config)
    out = []
    for i, channel in config.indexed_channels():
        reason = _unreachable(channel, ip_policy, clients, reached)
        if reason is not None:
            out.append(_warning(doc, "channels.yaml", ("channels", i),
                                f"no client can reach channel {channel.name!r}: {reason}"))
    return out


def _unreachable(channel: ChannelConfig, ip_policy: IpAllowlistPolicy, clients: dict[str, ClientEntry],
                 reached: set[str] | None) -> str | None:
    if channel.ip_allowlist is None:
        if ip_policy.unlisted_channels == "deny":
            return "it has no ip_allowlist and unlisted_channels is deny"
        admitted: list[IPNetwork] | None = None   # unrestricted
    else:
        admitted = _networks(channel.ip_allowlist, ip_policy)
        if not admitted:
            return "its ip_allowlist admits no address"
    if channel.authentication == "required":
        if not clients:
            return "no client is registered and enabled (policies/clients.yaml)"
        if admitted is not None and not any(
                net.version == own.version and net.overlaps(own)
                for entry in clients.values()
                for own in [*map(ipaddress.ip_network, entry.cidrs), *_networks(entry.ip_allowlist, ip_policy)]
                for net in admitted):
            return "no enabled client may call from an address its ip_allowlist admits"
    if reached is not None and channel.name not in reached:
        return "no authorization rule grants any request it routes"
    return None


def _channels_granted(config: Config) -> set[str] | None:
    """Channels some rule's permission routes to (None: no authorization policy, nothing to say)."""
    policy = config.policies.get("authorization")
    if not isinstance(policy, AuthorizationPolicy):
        return None   # absent: everything is denied, which the one warning about the file says
    reached: set[str] = set()
    wildcard = [p for rule in policy.rules for p in rule.permissions if p.resource_type == "*"]
    for rule in policy.rules:
        if rule.effect != "allow":
            continue
        for permission in rule.permissions:
            reached |= _routing_channels(config, permission)
    if wildcard:   # a `*` permission may grant any type: every channel passing its methods is reachable
        methods = {{"r": "GET", "s": "GET", "c": "POST", "u": "PUT", "d": "DELETE"}[letter]
                   for p in wildcard for letter in p.letters}
        reached |= {c.name for c in config.channels.channels if methods & set(c.methods)}
    return reached
