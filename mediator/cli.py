"""Command line: serve, check, sync, sandbox, dev, certs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from aiohttp import web

from mediator.app import build_app, handler_args
from mediator.config import Config, load_config
from mediator.errors import ConfigError
from mediator.tls import server_context

log = logging.getLogger("mediator")


def _load_or_report(config_dir: str) -> Config | None:
    try:
        return load_config(Path(config_dir))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


async def _run_sites(sites: list[tuple[web.Application, str, int, dict[str, int], object]]) -> None:
    runners = []
    for app, host, port, args, ssl_context in sites:
        runner = web.AppRunner(app, access_log=None, **args)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)  # type: ignore[arg-type]
        await site.start()
        runners.append(runner)
        scheme = "https" if ssl_context else "http"
        log.info("listening on %s://%s:%d", scheme, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for runner in reversed(runners):
        await runner.cleanup()


def _mediator_site(config: Config, host: str | None, port: int | None):  # type: ignore[no-untyped-def]
    listen = config.channels.server.listen
    ssl_context = server_context(listen.tls, config.root) if listen.tls else None
    return (build_app(config), host or listen.host, port if port is not None else listen.port,
            handler_args(config), ssl_context)


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return 2
    asyncio.run(_run_sites([_mediator_site(config, args.host, args.port)]))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return 2
    print(f"{args.config}: configuration is valid ({len(config.channels.channels)} channels)")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """One replica sync now, with a progress bar on stderr (mediator/replica)."""
    from mediator.replica.progress import run_sync_command

    config = _load_or_report(args.config)
    if config is None:
        return 2
    return asyncio.run(run_sync_command(config, full=True if args.full else None))


def cmd_sandbox(args: argparse.Namespace) -> int:
    from mediator.sandbox import build_sandbox_app

    asyncio.run(_run_sites([(build_sandbox_app(), args.host, args.port, {}, None)]))
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    """The sandbox and the mediator in one process: what `make run` starts."""
    from mediator.sandbox import build_sandbox_app

    config = _load_or_report(args.config)
    if config is None:
        return 2
    asyncio.run(_run_sites([(build_sandbox_app(), "127.0.0.1", args.sandbox_port, {}, None),
                            _mediator_site(config, None, None)]))
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from mediator.certs import make_dev_pki

    for issued in make_dev_pki(Path(args.out), tuple(args.client)):
        print(f"{issued.cert_path}  sha256={issued.fingerprint_sha256}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openimis-mediator", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the mediator")
    serve.add_argument("--config", required=True, help="directory with channels.yaml and policies/")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check", help="validate the configuration; errors as file:line:col, exit 2")
    check.add_argument("--config", required=True)
    check.set_defaults(func=cmd_check)
    sync = sub.add_parser("sync", help="sync the master-data replica now (policies/replica.yaml); exit 1 on failure")
    sync.add_argument("--config", required=True)
    sync.add_argument("--full", action="store_true", help="full sync even if an incremental one would do")
    sync.set_defaults(func=cmd_sync)
    sandbox = sub.add_parser("sandbox", help="run the local openIMIS stand-in (development aid)")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8000)
    sandbox.set_defaults(func=cmd_sandbox)
    dev = sub.add_parser("dev", help="sandbox + mediator in one process (make run)")
    dev.add_argument("--config", required=True)
    dev.add_argument("--sandbox-port", type=int, default=8000)
    dev.set_defaults(func=cmd_dev)
    certs = sub.add_parser("certs", help="make a development CA, server and client certificates")
    certs.add_argument("--out", default="certs")
    certs.add_argument("--client", action="append", default=[])
    certs.set_defaults(func=cmd_certs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    result: int = args.func(args)
    return result
