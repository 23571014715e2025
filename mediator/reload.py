"""Hot reload: on SIGHUP, and when `channels.yaml` or a file under `policies/` changes (polled).

A reload validates the whole directory with `load_runnable_config` (as at start and as `check`: the documents,
then the TLS and key files they name); a refused configuration is logged as `file:line:col: message`, counted,
and the running one keeps serving. An accepted one is compiled into a new Runtime with `Runtime.build(config,
metrics, previous)`, which takes over every running resource whose settings are unchanged (upstream pools and
logins, the Redis client, the identity replay store and JWKS caches, the replica with its data and sync task,
bulkhead/breaker state of kept upstreams, idempotency records). `Runtime.start_new` starts what is new before
the swap (a failure there refuses the reload and closes what it started); the swap is one assignment, and a
request keeps the runtime it started with. What the new runtime no longer uses is closed by
`Runtime.close_retired` once the requests that started on the old runtime (and on any older one still
draining) have finished, bounded by the longest channel timeout of the old configuration plus a login.

Lifetime: one ConfigReloader per application, started and stopped by the app's cleanup context; it
stops before the app's runtime resources close, so retired resources are closed first.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web

from mediator.app import METRICS, RUNTIME, Runtime
from mediator.config import Config
from mediator.config.files import load_runnable_config
from mediator.errors import ConfigError
from mediator.logs import JsonEvent

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
        self._closing: set[asyncio.Task[None]] = set()
        self._draining: list[Runtime] = []
        """Runtimes replaced by a reload whose retired resources are not closed yet, oldest first."""

    @property
    def config(self) -> Config:
        return self.app[RUNTIME].current.config

    async def reload(self, trigger: str) -> bool:
        """Validate and swap in the configuration on disk. True if it is now in use."""
        metrics = self.app[METRICS]
        async with self._lock:
            self._stamps = watched_files(self.root)
            try:
                config = await asyncio.to_thread(load_runnable_config, self.root)
                swapped = await self._swap(config)
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error(JsonEvent.of("reload.refused", trigger=trigger, file=problem.file, line=problem.line,
                                            column=problem.column, problem=problem.message))
                metrics.config_reloads.labels("failure", trigger).inc()
                return False
            except Exception:  # a reload must never take down the process that serves
                log.exception(JsonEvent.of("reload.failed", trigger=trigger))
                metrics.config_reloads.labels("failure", trigger).inc()
                return False
            metrics.config_reloads.labels("success", trigger).inc()
            metrics.config_last_reload_success.set_to_current_time()
            log.info(JsonEvent.of("reload.done", trigger=trigger, channels=len(config.channels.channels),
                                  upstreams_started=list(swapped[0]), upstreams_retired=list(swapped[1])))
            return True

    async def _swap(self, config: Config) -> tuple[list[str], list[str]]:
        holder = self.app[RUNTIME]
        old = holder.current
        new = Runtime.build(config, self.app[METRICS], previous=old)
        await new.start_new(old)  # raises (having closed what it started) if something new cannot start
        for key in RESTART_ONLY:
            if getattr(old.config.channels.server, key) != getattr(config.channels.server, key):
                log.warning(JsonEvent.of("reload.restart_needed", setting=f"server.{key}"))
        holder.current = new
        bound = max((c.timeout_s for c in old.config.channels.channels), default=30.0) + LOGIN_ALLOWANCE_S
        self._draining.append(old)
        task = asyncio.create_task(self._retire(old, new, bound), name="reload: retire previous runtime")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        task.add_done_callback(self._closing.discard)
        started = new.upstreams.keys() - {n for n, u in old.upstreams.items() if new.upstreams.get(n) is u}
        return sorted(started), [u.name for u in old.retired_upstreams(new)]

    async def _retire(self, old: Runtime, new: Runtime, bound_s: float) -> None:
        """Close what `new` no longer uses once `old`'s requests have finished. Runtimes retired earlier
        and still draining count too: a resource they share with `old` is closed here."""
        upstreams = old.retired_upstreams(new)

        async def finished() -> None:
            # Requests that started on the old runtime may not have reached the upstream yet.
            while any(r.in_flight > 0 for r in self._draining[:self._draining.index(old) + 1]):
                await asyncio.sleep(0.05)
            for upstream in upstreams:
                await upstream.drained()

        try:
            await asyncio.wait_for(finished(), bound_s)
        except TimeoutError:
            log.warning(JsonEvent.of("reload.drain_timeout", seconds=bound_s,
                                      effect="closing what the previous configuration alone used"))
        finally:  # also when the application stops first (close() cancels the wait, never the closing)
            self._draining.remove(old)
            task = asyncio.current_task()
            if task is not None:
                self._closing.add(task)
            await old.close_retired(new)  # logs, never raises, a close that fails

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
            if task not in self._closing:  # a retirement already closing resources runs to its end
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
