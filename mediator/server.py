"""Running the mediator as a service: listeners, signals, graceful shutdown, worker processes.

`serve()` runs one mediator process: the public FHIR listener, the optional metrics listener
(`server.metrics`, never the public port), SIGHUP → reload, SIGTERM/SIGINT → stop accepting, drain the
requests in flight for at most `server.shutdown.drain_timeout_s`, close the upstream pools, return.

`supervise()` is the parent of `serve --workers N`: it starts N copies of `serve` as child processes that
share the public port through SO_REUSEPORT (the kernel spreads connections), forwards SIGTERM, SIGINT and
SIGHUP to them, restarts a worker that dies on its own (at most MAX_RESTARTS per minute per worker, then
it stops everything and exits 1), and exits when they have all exited: 0 if they all exited 0.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from ssl import SSLContext
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mediator.app import READINESS, RUNTIME, build_app, drop_server_header, handle_healthz, handle_readyz, handler_args
from mediator.config import Config
from mediator.errors import MediatorError
from mediator.logs import JsonEvent
from mediator.metrics import Metrics
from mediator.reload import attach_reloader
from mediator.tls import server_context

log = logging.getLogger("mediator.server")

MAX_RESTARTS = 5


@dataclass(slots=True)
class Site:
    """One listener: an application and where it listens."""

    app: web.Application
    host: str
    port: int
    name: str
    ssl_context: SSLContext | None = None
    handler_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of aiohttp's request handler (mediator.app.handler_args)."""
    reuse_port: bool = False
    shutdown_timeout: float = 60.0
    port_setting: str = "the port"
    """Where an operator changes this listener's port (named when the port is taken)."""


class ListenError(MediatorError):
    """A listener could not bind its address (port in use, address not local, no permission)."""


def build_metrics_app(metrics: Metrics, mediator_app: web.Application | None = None) -> web.Application:
    """The ops listener's application: GET /metrics, and /healthz and /readyz of `mediator_app` (so probes
    work without a client certificate even when the FHIR listener requires one)."""

    async def handle_metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.on_response_prepare.append(drop_server_header)
    app.router.add_get("/metrics", handle_metrics)
    if mediator_app is not None:
        app[RUNTIME] = mediator_app[RUNTIME]  # the same holder: readiness follows reloads
        app[READINESS] = mediator_app[READINESS]
        app.router.add_get("/healthz", handle_healthz)
        app.router.add_get("/readyz", handle_readyz)
    return app


def mediator_sites(config: Config, host: str | None = None, port: int | None = None,
                   worker_index: int | None = None) -> list[Site]:
    server = config.channels.server
    metrics = Metrics()
    if worker_index is not None:
        metrics.set_worker(worker_index)
    app = build_app(config, metrics)
    attach_reloader(app, config.root)
    listen = server.listen
    ssl_context = server_context(listen.tls, config.root) if listen.tls else None
    sites = [Site(app, host or listen.host, port if port is not None else listen.port, "fhir", ssl_context,
                  handler_args(config), reuse_port=worker_index is not None,
                  shutdown_timeout=server.shutdown.drain_timeout_s,
                  port_setting="server.listen.port in channels.yaml, or run with --port")]
    if server.metrics is not None:
        # Workers cannot share a metrics port usefully (a scrape would see one random worker): i gets port + i.
        metrics_port = server.metrics.port + (worker_index or 0) if server.metrics.port else 0
        sites.append(Site(build_metrics_app(metrics, app), server.metrics.host, metrics_port, "metrics",
                          port_setting="server.metrics.port in channels.yaml"))
    return sites


async def run_sites(sites: Sequence[Site]) -> None:
    """Start the sites in order, wait for SIGTERM/SIGINT, then stop them in reverse order.

    Stopping a site closes its listening socket first (new connections are refused), then waits up to
    its shutdown_timeout for requests in flight, then runs the app's cleanup (upstream pools closed).
    """
    from mediator.reload import RELOADER

    runners: list[web.AppRunner] = []
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        for site in sites:
            runner = web.AppRunner(site.app, access_log=None, shutdown_timeout=site.shutdown_timeout,
                                   **site.handler_args)
            await runner.setup()
            runners.append(runner)
            tcp = web.TCPSite(runner, site.host, site.port, ssl_context=site.ssl_context,
                              reuse_port=site.reuse_port or None)
            try:
                await tcp.start()
            except OSError as exc:
                reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
                raise ListenError(f"cannot listen on {site.host}:{site.port} ({site.name} listener): {reason}; "
                                  f"change {site.port_setting}") from None
            scheme = "https" if site.ssl_context else "http"
            log.info(JsonEvent.of("server.listening", listener=site.name, url=f"{scheme}://{site.host}:{site.port}"))
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        reloaders = [s.app[RELOADER] for s in sites if RELOADER in s.app]
        pending: set[asyncio.Task[bool]] = set()

        def on_sighup() -> None:
            for reloader in reloaders:
                task = asyncio.ensure_future(reloader.reload("sighup"))
                pending.add(task)
                task.add_done_callback(pending.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        await stop.wait()
        log.info(JsonEvent.of("server.stopping", effect="no new connections; draining requests in flight"))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for runner in reversed(runners):
            await runner.cleanup()
    log.info(JsonEvent.of("server.stopped"))


def supervise(worker_argv: Sequence[str], workers: int) -> int:
    """Run `worker_argv + ["--worker-index", i]` N times; see the module docstring for the contract."""
    children: dict[int, subprocess.Popen[bytes]] = {}
    restarts: dict[int, list[float]] = {i: [] for i in range(workers)}
    stopping = False
    failed = False

    def spawn(index: int) -> None:
        children[index] = subprocess.Popen([*worker_argv, "--worker-index", str(index)])
        log.info(JsonEvent.of("server.worker_started", worker=index, pid=children[index].pid))

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for index in range(workers):
        spawn(index)
    while children:
        time.sleep(0.1)
        for index, child in list(children.items()):
            code = child.poll()
            if code is None:
                continue
            del children[index]
            if stopping:
                log.info(JsonEvent.of("server.worker_exited", worker=index, pid=child.pid, code=code))
                failed = failed or code != 0
                continue
            now = time.monotonic()
            restarts[index] = [t for t in restarts[index] if now - t < 60] + [now]
            if len(restarts[index]) > MAX_RESTARTS:
                log.error(JsonEvent.of("server.worker_crash_loop", worker=index, code=code,
                                       effect="stopping all workers"))
                stopping = failed = True
                forward(signal.SIGTERM, None)
                continue
            log.error(JsonEvent.of("server.worker_restarted", worker=index, pid=child.pid, code=code))
            spawn(index)
    return 1 if failed else 0


def worker_command(argv: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "mediator", *argv]
