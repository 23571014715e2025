"""The pipeline's stages in their one declared order (STYLE rule 1). No priorities, no discovery.

client_ip → channel → ip → [load_shed] → authentication → [over_limit] → request (body read and parsed
once) → search (parameters) → [lookup_charge] → authorization (always: absent policy denies) → write
(the write firewall; always: absent profiles refuse every write) → [rate limit]; then the route, response
and finishing steps of mediator.chain. tests/test_chain.py pins the whole order. load_shed is built only when
the caller passes the runtime's upstream guards (the app; explain and policy tests describe the policy, not
the load, and leave it out); over_limit likewise (a shortcut of the rate limit's refusals, built with
the rate limits) and lookup_charge only with the rate limits and the authorization policy.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from prometheus_client import CollectorRegistry

from mediator.addresses import ClientIpPolicy, IpSetTable
from mediator.bulkhead import UpstreamGuard
from mediator.config import Config
from mediator.config.authorization import AuthorizationPolicy
from mediator.facilities import FacilityDirectory, FacilitySource
from mediator.identity import Identity
from mediator.logs import JsonEvent
from mediator.metrics import Metrics
from mediator.pipeline import Stage
from mediator.redis_store import RedisStore
from mediator.search_parameters import SearchParameterStage
from mediator.stages.authentication import AuthenticationStage, VouchedUsers
from mediator.stages.authorization import AuthorizationStage
from mediator.stages.authorization_absent import NoAuthorizationPolicyStage
from mediator.stages.channel_match import ChannelMatchStage, ChannelTable
from mediator.stages.client_ip import ClientIpStage
from mediator.stages.ip_allowlist import IpAllowlistStage
from mediator.stages.load_shed import LoadShedStage
from mediator.stages.lookup_charge import LookupChargeStage
from mediator.stages.over_limit import OverLimitStage
from mediator.stages.rate_limit import RateLimitStage, RateLimitTable
from mediator.stages.request_body import RequestBodyStage
from mediator.stages.write_firewall import WriteFirewallStage
from mediator.upstream import OpenImisUpstream

# The full declared order. Stages not yet built (later issues) are simply absent from build_stages;
# whatever is built must appear in this order.
ORDER = ("client_ip", "channel", "ip", "load_shed", "authentication", "over_limit", "request", "search",
         "lookup_charge", "authorization", "write", "rate_limit")


def build_stages(config: Config, upstreams: Mapping[str, OpenImisUpstream] | None = None,
                 registry: CollectorRegistry | None = None, identity: Identity | None = None, *,
                 redis: RedisStore | None = None, metrics: Metrics | None = None,
                 guards: Mapping[str, UpstreamGuard] | None = None,
                 authentication: Stage | None = None,
                 facility_directory: FacilityDirectory | None = None,
                 facility_source: FacilitySource | None = None) -> list[Stage]:
    """`upstreams`: the runtime's upstream clients (stages that look things up in openIMIS share
    them); absent: unstarted clients are made, for listing and tests of order only. `identity`: the
    runtime's started Identity (JWKS caches, replay store); absent: a fresh one, for listing only.
    `guards`: the runtime's per-upstream bulkhead + breaker, shared with forwarding (absent: fresh ones for
    the lookups, and no load_shed stage).
    `redis`: the app's shared Redis handle (stages needing shared state use it); `metrics`: the app's.
    `facility_source`: where the facility directory reads facilities first (the runtime's replica).

    Offline evaluation (`mediator.offline`: explain, policy tests) passes `authentication`, a stage that
    stands in for the authentication stage (no Identity is built: no signing key, no replay store), an
    unconfigured `redis` (in-memory counters), fresh `guards` and a `facility_directory` of assumed facts."""
    shed_guards = guards  # only the caller's: fresh guards would never shed anything
    if upstreams is None:
        server = config.channels.server
        upstreams = {name: OpenImisUpstream(name, u, server.public_base_url)
                     for name, u in config.channels.upstreams.items()}
    redis = redis if redis is not None else RedisStore(config.channels.server.redis)
    # Absent policies/authorization.yaml: nothing is allowed (README "policies/authorization.yaml").
    authorization: Stage = NoAuthorizationPolicyStage()
    users = None
    directory: FacilityDirectory | None = facility_directory
    if "authorization" not in config.policies:
        logging.getLogger("mediator.authorization").warning(JsonEvent.of(
            "authorization.no_policy", file="policies/authorization.yaml", effect="every request is denied"))
    if "authorization" in config.policies:
        if guards is None:
            guards = {name: UpstreamGuard.build(name, u.bulkhead, u.circuit_breaker)
                      for name, u in config.channels.upstreams.items()}
        authorization = AuthorizationStage.from_config(config, upstreams, registry, guards,
                                                       directory=facility_directory, source=facility_source)
        # Trusted-header users are checked against the same directory authorization uses.
        users = VouchedUsers(authorization.directory,
                             authorization.policy.facility_directory.refresh_on_miss_after_s)
        directory = authorization.directory
    rate_limits = RateLimitTable.from_config(config)
    rate_limit = RateLimitStage(rate_limits, redis, metrics) if rate_limits is not None else None
    stages: list[Stage] = [
        ClientIpStage(ClientIpPolicy.from_config(config)),
        ChannelMatchStage(ChannelTable.from_config(config)),
        IpAllowlistStage(IpSetTable.from_config(config)),
        *([LoadShedStage(shed_guards)] if shed_guards is not None else []),
        authentication or AuthenticationStage(identity or Identity.from_config(config), users),
        *([OverLimitStage(rate_limit.table, rate_limit.refusals, metrics)]
          if rate_limit is not None and shed_guards is not None else []),
        RequestBodyStage.from_config(config),
        SearchParameterStage.from_config(config),
        *([LookupChargeStage(rate_limit, config.policy("authorization", AuthorizationPolicy).rules)]
          if rate_limit is not None and "authorization" in config.policies else []),
        authorization,
        # One facility directory per runtime: the firewall resolves references with authorization's.
        WriteFirewallStage.from_config(config, directory),
    ]
    if rate_limit is not None:
        stages.append(rate_limit)
    names = [s.name for s in stages]
    if names != [n for n in ORDER if n in names] or not set(names) <= set(ORDER):
        raise RuntimeError(f"stages {names} are not in the declared ORDER {ORDER}")
    return stages
