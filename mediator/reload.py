"""Hot reload: on SIGHUP, and when `channels.yaml` or a file under `policies/` changes (polled).

A reload validates the whole directory with `load_config` (the same code as at start and as `check`);
a refused configuration is logged as `file:line:col: message`, counted, and the running one keeps
serving. An accepted one is compiled into a new Runtime and swapped in with one assignment; a request
keeps the runtime it started with. Upstream pools: an upstream whose configuration is unchanged is
reused (same pool, same login); a new or changed one is started before the swap; a removed or replaced
one is closed once the requests that started on the old runtime have finished (bounded by the longest
channel timeout of the old configuration plus a login).

Lifetime: one ConfigReloader per application, started and stopped by the app's cleanup context.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web

from mediator.app import METRICS, RUNTIME, Runtime
from mediator.config import Config, load_config
from mediator.errors import ConfigError
from mediator.upstream import OpenImisUpstream

log = logging.getLogger("mediator.reload")

# Changing these needs a restart: they shape listeners, sinks and the HTTP parser, built once at start.
RESTART_ONLY = ("listen", "limits", "metrics", "audit", "shutdown")
LOGIN_ALLOWANCE_S = 20.0

FileStamp = tuple[int, int, int]


def watched_files(root: Path) -> dict[Path, FileStamp]:
    """(inode, mtime_ns, size) of channels.yaml and every file under policies/: any change means edited."""
    paths = [root / "channels.yaml"]
    policies = root / "policies"
    if policies.is_dir():
        paths += sorted(p for p in policies.iterdir() if p.is_file())
    stamps: dict[Path, FileStamp] = {}
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            continue
        stamps[path] = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    return stamps


class ConfigReloader:
    def __init__(self, app: web.Application, root: Path) -> None:
        self.app = app
        self.root = root
        self._lock = asyncio.Lock()
        self._stamps = watched_files(root)
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def config(self) -> Config:
        return self.app[RUNTIME].current.config

    async def reload(self, trigger: str) -> bool:
        """Validate and swap in the configuration on disk. True if it is now in use."""
        metrics = self.app[METRICS]
        async with self._lock:
            self._stamps = watched_files(self.root)
            try:
                config = await asyncio.to_thread(load_config, self.root)
                swapped = await self._swap(config)
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error("configuration refused, the running one stays in use: %s", problem)
                metrics.config_reloads.labels("failure", trigger).inc()
                return False
            except Exception:  # a reload must never take down the process that serves
                log.exception("configuration reload failed, the running one stays in use")
                metrics.config_reloads.labels("failure", trigger).inc()
                return False
            metrics.config_reloads.labels("success", trigger).inc()
            metrics.config_last_reload_success.set_to_current_time()
            log.info("configuration reloaded (%s): %d channels, upstreams started %s, retired %s", trigger,
                     len(config.channels.channels), swapped[0] or "none", swapped[1] or "none")
            return True

    async def _swap(self, config: Config) -> tuple[list[str], list[str]]:
        holder = self.app[RUNTIME]
        old = holder.current
        new = Runtime.build(config, self.app[METRICS])
        started: list[OpenImisUpstream] = []
        for name, upstream in list(new.upstreams.items()):
            previous = old.upstreams.get(name)
            if previous is not None and previous.config == upstream.config \
                    and previous.public_base_url == upstream.public_base_url:
                new.upstreams[name] = previous
            else:
                await upstream.start()
                started.append(upstream)
        retired = [u for name, u in old.upstreams.items() if new.upstreams.get(name) is not u]
        for key in RESTART_ONLY:
            if getattr(old.config.channels.server, key) != getattr(config.channels.server, key):
                log.warning("server.%s changed; it takes effect at the next restart", key)
        holder.current = new
        if retired:
            bound = max((c.timeout_s for c in old.config.channels.channels), default=30.0) + LOGIN_ALLOWANCE_S
            task = asyncio.create_task(self._retire(old, retired, bound))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return [u.name for u in started], [u.name for u in retired]

    @staticmethod
    async def _retire(old: Runtime, upstreams: list[OpenImisUpstream], bound_s: float) -> None:
        async def finished() -> None:
            # Requests that started on the old runtime may not have reached the upstream yet.
            while old.in_flight > 0:
                await asyncio.sleep(0.05)
            for upstream in upstreams:
                await upstream.drained()

        try:
            await asyncio.wait_for(finished(), bound_s)
        except TimeoutError:
            log.warning("requests on the previous configuration still running after %.0fs; closing %s",
                        bound_s, ", ".join(u.name for u in upstreams))
        finally:  # also when the application stops first
            for upstream in upstreams:
                await upstream.close()

    async def watch(self) -> None:
        """Poll the files every `server.reload.poll_interval_s` (read anew each round; 0: SIGHUP only)."""
        while True:
            interval = self.config.channels.server.reload.poll_interval_s
            await asyncio.sleep(interval if interval > 0 else 1.0)
            if interval <= 0:
                continue
            if watched_files(self.root) != self._stamps:
                await self.reload("file")

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        for task in list(self._retiring):
            try:
                await task
            except asyncio.CancelledError:
                pass


RELOADER = web.AppKey("reloader", ConfigReloader)


def attach_reloader(app: web.Application, root: Path) -> ConfigReloader:
    """Reload support for an app built by build_app: file polling runs while the app runs."""
    reloader = ConfigReloader(app, root)
    app[RELOADER] = reloader

    async def polling(app: web.Application):  # type: ignore[no-untyped-def]
        task = asyncio.create_task(reloader.watch())
        yield
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        await reloader.close()

    app.cleanup_ctx.append(polling)
    return reloader
