"""`openimis-mediator sync`: one sync from the command line, with a per-type progress bar on stderr."""

from __future__ import annotations

import sys
from typing import TextIO

from mediator.config import Config
from mediator.metrics import Metrics
from mediator.replica.policy import ReplicaPolicy
from mediator.replica.service import Replica, store_for
from mediator.replica.sync import SyncBusy, SyncFailed
from mediator.upstream import OpenImisUpstream

BAR_WIDTH = 30


class ProgressBar:
    """One line per resource type, redrawn in place (`\\r`), ended with a newline once the type is complete
    (so a log line the sync writes next starts on a line of its own) or when the type changes."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.label: str | None = None

    def __call__(self, label: str, done: int, total: int | None) -> None:
        if self.label is not None and label != self.label:
            self.out.write("\n")
        self.label = label
        if total:
            filled = min(BAR_WIDTH, BAR_WIDTH * done // total)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            self.out.write(f"\r{label:<28} [{bar}] {done}/{total}")
            if done >= total:
                self.out.write("\n")
                self.label = None
        else:
            self.out.write(f"\r{label:<28} {done}")
        self.out.flush()

    def finish(self) -> None:
        if self.label is not None:
            self.out.write("\n")
            self.label = None


async def run_sync_command(config: Config, full: bool | None, out: TextIO = sys.stderr) -> int:
    policy = config.policies.get("replica")
    if not isinstance(policy, ReplicaPolicy):
        print("policies/replica.yaml is absent: there is no replica to sync", file=out)
        return 2
    if policy.store == "memory":
        print("note: store is memory, so this run only proves a sync works; each mediator process syncs "
              "its own memory store", file=out)
    server = config.channels.server
    upstream = OpenImisUpstream(policy.upstream, config.channels.upstreams[policy.upstream], server.public_base_url)
    replica = Replica(policy, store_for(config, policy), upstream, Metrics(), server.public_base_url)
    bar = ProgressBar(out)
    await upstream.start()
    try:
        await replica.start()
        report = await replica.sync(full=full, progress=bar)
    except SyncBusy:
        bar.finish()
        print("another instance is syncing the shared store right now; nothing done", file=out)
        return 1
    except SyncFailed as exc:
        bar.finish()
        print(f"sync failed, the replica keeps its last good data: {exc}", file=out)
        return 1
    finally:
        await replica.close()
        await upstream.close()
    bar.finish()
    counts = ", ".join(f"{t} {n}" for t, n in sorted(report.counts.items()))
    print(f"{report.kind} sync done in {report.seconds:.1f}s: {report.changed} changed, {report.removed} removed; "
          f"{counts}", file=out)
    return 0
