"""Command line: serve, check, explain, test, sync, sandbox, dev, certs, token."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mediator.config import Config, load_config
from mediator.errors import ConfigError
from mediator.logs import JsonEvent, configure_logging
from mediator.server import ListenError, Site, mediator_sites, run_sites, supervise, worker_command

if TYPE_CHECKING:
    from mediator.offline import AssumedFacts

log = logging.getLogger("mediator")


def _load_or_report(config_dir: str, runnable: bool = False) -> Config | None:
    """The configuration, or None after printing every problem. `runnable`: the files it names (TLS,
    keys) are read too, as `serve` will (mediator.config.files)."""
    from mediator.config.files import load_runnable_config

    root = Path(config_dir)
    if not root.is_dir():
        print(f"--config {config_dir}: no such directory (it should hold channels.yaml and policies/)",
              file=sys.stderr)
        return None
    try:
        return load_runnable_config(root) if runnable else load_config(root)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config, runnable=True)
    if config is None:
        return 2
    if args.workers > 1 and args.worker_index is None:
        argv = ["--log-level", args.log_level, "--log-format", args.log_format, "serve", "--config", args.config]
        if args.host:
            argv += ["--host", args.host]
        if args.port is not None:
            argv += ["--port", str(args.port)]
        argv += ["--event-loop", args.event_loop]
        return supervise(worker_command(argv), args.workers)
    return _run(mediator_sites(config, args.host, args.port, args.worker_index), args.event_loop)


def _loop_factory(event_loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when asked for (an optional dependency: `pip install 'openimis-mediator[speed]'`)."""
    if event_loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        raise SystemExit("openimis-mediator: --event-loop uvloop needs uvloop "
                         "(pip install 'openimis-mediator[speed]')") from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _run(sites: list[Site], event_loop: str = "asyncio") -> int:
    """Serve until stopped; a listener that cannot bind is one line on stderr and exit 1 (no traceback)."""
    factory = _loop_factory(event_loop)
    if factory is not None:  # the default says nothing (a port in use stays a one-line error)
        logging.getLogger("mediator.server").info(JsonEvent.of("server.event_loop", event_loop=event_loop))
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(run_sites(sites))
    except ListenError as exc:
        print(f"openimis-mediator: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from mediator.config.lint import config_warnings

    config = _load_or_report(args.config, runnable=args.files)
    if config is None:
        return 2
    warnings = config_warnings(config)
    for warning in warnings:
        print(warning, file=sys.stderr)
    noted = f", {len(warnings)} warning{'s' if len(warnings) != 1 else ''}" if warnings else ""
    print(f"{args.config}: configuration is valid ({len(config.channels.channels)} channels{noted})")
    code = 2 if warnings and args.strict else 0
    if args.with_tests:
        from mediator.policy_tests import run_policy_tests

        tested, lines = run_policy_tests(config, [])
        for line in lines:
            print(line, file=sys.stderr if tested == 2 else sys.stdout)
        code = max(code, tested)
    return code


def cmd_test(args: argparse.Namespace) -> int:
    from mediator.policy_tests import run_policy_tests

    config = _load_or_report(args.config)
    if config is None:
        return 2
    code, lines = run_policy_tests(config, args.cases, args.junit)
    for line in lines:
        print(line, file=sys.stderr if code == 2 else sys.stdout)
    return code


def _facts_or_report(path: str | None) -> AssumedFacts | None | bool:
    """The facts of `explain --facts`: None without the option, False (reported) when invalid."""
    from mediator.config import validate_document
    from mediator.config.yaml_source import load_yaml
    from mediator.offline import AssumedFacts

    if path is None:
        return None
    try:
        facts, problems = validate_document(load_yaml(Path(path), path), AssumedFacts)
    except ConfigError as exc:
        facts, problems = None, exc.problems
    for problem in problems:
        print(problem, file=sys.stderr)
    return facts if facts is not None else False


def cmd_explain(args: argparse.Namespace) -> int:
    from mediator.explain import described_principal, explain

    config = _load_or_report(args.config)
    if config is None:
        return 2
    facts = _facts_or_report(args.facts)
    if facts is False or facts is True:
        return 2
    try:
        principal = described_principal(args.claims, args.client, args.roles, args.facility, args.user,
                                        args.scopes, args.auth_method or ("access_token" if args.scopes else "mtls"))
        body = Path(args.body).read_bytes() if args.body else None
    except (OSError, ValueError) as exc:
        print(f"explain: {exc}", file=sys.stderr)
        return 2
    if facts is None:
        from mediator.config.lint import named_environment_variables

        for _, _, variable, purpose in named_environment_variables(config):
            if not os.environ.get(variable):
                print(f"explain: environment variable {variable} is not set ({purpose} needs it): lookups in "
                      "openIMIS will fail; set it, or answer them offline with --facts FILE", file=sys.stderr)
    headers = dict(h.split(":", 1) for h in args.header)
    result = asyncio.run(explain(config, args.method, args.path, principal, body=body, client_ip=args.ip,
                                 headers={k.strip(): v.strip() for k, v in headers.items()},
                                 facts=facts))
    print(f"{args.method.upper()} {args.path}")
    for line in result.lines():
        print(line)
    return 0 if result.final is None else 1


def cmd_sync(args: argparse.Namespace) -> int:
    """One replica sync now, with a progress bar on stderr (mediator/replica)."""
    from mediator.replica.progress import run_sync_command

    config = _load_or_report(args.config)
    if config is None:
        return 2
    return asyncio.run(run_sync_command(config, full=True if args.full else None))


def cmd_sandbox(args: argparse.Namespace) -> int:
    from mediator.sandbox import build_sandbox_app

    return _run([Site(build_sandbox_app(), args.host, args.port, "sandbox", port_setting="it with --port")])


def cmd_dev(args: argparse.Namespace) -> int:
    """The sandbox and the mediator in one process: what `make run` starts."""
    from mediator.sandbox import build_sandbox_app

    config = _load_or_report(args.config, runnable=True)
    if config is None:
        return 2
    return _run([Site(build_sandbox_app(), "127.0.0.1", args.sandbox_port, "sandbox",
                      port_setting="it with --sandbox-port"), *mediator_sites(config)])


def cmd_certs(args: argparse.Namespace) -> int:
    from mediator.certs import make_dev_pki

    for issued in make_dev_pki(Path(args.out), tuple(args.client)):
        print(f"{issued.cert_path}  sha256={issued.fingerprint_sha256}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Development aid: mint a client assertion with a vendor key and exchange it at /auth/token."""
    import json

    from mediator.identity.client import request_token

    cert = (args.cert, args.key) if args.cert else None
    status, body = request_token(args.url, args.client, Path(args.key).read_bytes(), args.scope,
                                 args.cacert, cert)
    print(json.dumps(body, indent=2))
    return 0 if status == 200 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openimis-mediator", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=("json", "text"), default="json",
                        help="json: one JSON object per line with the request id (default); text: for a terminal")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the mediator")
    serve.add_argument("--config", required=True, help="directory with channels.yaml and policies/")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes sharing the port (SO_REUSEPORT), supervised by this process")
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio",
                       help="uvloop: libuv's event loop (optional dependency; README \"Benchmarks\")")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check", help="validate the configuration; errors as file:line:col, exit 2; "
                           "warnings too, exit 0 (2 with --strict)")
    check.add_argument("--config", required=True)
    check.add_argument("--strict", action="store_true", help="warnings fail the check too (exit 2)")
    check.add_argument("--files", action="store_true",
                       help="also read the TLS and key files the configuration names, as serve and a reload do")
    check.add_argument("--with-tests", action="store_true",
                       help="also run the policy tests in DIR/policies/tests (exit 1 if one fails)")
    check.set_defaults(func=cmd_check)
    explain = sub.add_parser("explain", help="print every stage's decision for a described request")
    explain.add_argument("--config", required=True)
    explain.add_argument("--method", default="GET")
    explain.add_argument("--path", required=True, help="as the client sends it, e.g. /fhir/Claim/ or "
                         "'/fhir/Patient?identifier=070707070'")
    explain.add_argument("--client", help="client_id of the described principal (absent: no principal)")
    explain.add_argument("--roles", help="comma-separated roles")
    explain.add_argument("--facility", help="comma-separated health facility codes, e.g. JMHOS001")
    explain.add_argument("--user", help="user id (needed by user/ permissions)")
    explain.add_argument("--scopes", help="space- or comma-separated granted token scopes")
    explain.add_argument("--auth-method", help="default: access_token with --scopes, else mtls (no scope limit)")
    explain.add_argument("--claims", help="JSON file with the principal's fields (instead of the options above)")
    explain.add_argument("--body", help="file with the request body")
    explain.add_argument("--ip", default="127.0.0.1", help="client address (default 127.0.0.1)")
    explain.add_argument("--header", action="append", default=[], help="extra request header 'Name: value'")
    explain.add_argument("--facts", help="YAML file of assumed facts (facilities, claims; README \"Policy tests\"): "
                         "lookups answered from it, fully offline. Absent: asked of openIMIS, as live")
    explain.set_defaults(func=cmd_explain)
    test = sub.add_parser("test", help="run policy test cases offline; one line per case, exit 1 on a failure")
    test.add_argument("--config", required=True)
    test.add_argument("cases", nargs="*", help="case files or directories (default: DIR/policies/tests/*.yaml)")
    test.add_argument("--junit", help="also write a JUnit XML report to this file")
    test.set_defaults(func=cmd_test)
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
    token = sub.add_parser("token", help="get an access token from /auth/token (development aid)")
    token.add_argument("--client", required=True, help="client id in policies/clients.yaml")
    token.add_argument("--key", required=True, help="the client's PEM private key, e.g. certs/vendor-a.key")
    token.add_argument("--url", default="https://localhost:8443/auth/token")
    token.add_argument("--scope", default="system/*.read")
    token.add_argument("--cacert", default="certs/ca.crt")
    token.add_argument("--cert", help="also present this client certificate (mTLS)")
    token.set_defaults(func=cmd_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    result: int = args.func(args)
    return result
