"""The pipeline's stages in their one declared order (STYLE rule 1). No priorities, no discovery.

client_ip → channel → ip → [authentication: issue 3] → [authorization: issue 4] → [rate limit: issue 5]
→ route (cache/upstream, in mediator.app). A test asserts this order.
"""

from __future__ import annotations

from mediator.config import Config
from mediator.metrics import Metrics
from mediator.pipeline import Stage
from mediator.redis_store import RedisStore
from mediator.stages.channel_match import ChannelMatchStage, ChannelTable
from mediator.stages.client_ip import ClientIpPolicy, ClientIpStage
from mediator.stages.ip_allowlist import IpAllowlistStage, IpSetTable
from mediator.stages.rate_limit import RateLimitStage, RateLimitTable

# The full declared order. Stages not yet built (later issues) are simply absent from build_stages;
# whatever is built must appear in this order.
ORDER = ("client_ip", "channel", "ip", "authentication", "authorization", "rate_limit")


def build_stages(config: Config, *, redis: RedisStore | None = None,
                 metrics: Metrics | None = None) -> list[Stage]:
    """`redis`: the app's shared Redis handle (stages needing shared state use it); `metrics`: the app's."""
    redis = redis if redis is not None else RedisStore(config.channels.server.redis)
    stages: list[Stage] = [
        ClientIpStage(ClientIpPolicy.from_config(config)),
        ChannelMatchStage(ChannelTable.from_config(config)),
        IpAllowlistStage(IpSetTable.from_config(config)),
    ]
    rate_limits = RateLimitTable.from_config(config)
    if rate_limits is not None:
        stages.append(RateLimitStage(rate_limits, redis, metrics))
    names = [s.name for s in stages]
    if names != [n for n in ORDER if n in names] or not set(names) <= set(ORDER):
        raise RuntimeError(f"stages {names} are not in the declared ORDER {ORDER}")
    return stages
