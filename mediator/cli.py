"""Command line: serve, check, explain, sandbox, dev, certs, token."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from mediator.config import Config, load_config
from mediator.errors import ConfigError
from mediator.logs import configure_logging
from mediator.server import Site, mediator_sites, run_sites, supervise, worker_command

log = logging.getLogger("mediator")


def _load_or_report(config_dir: str) -> Config | None:
    try:
        return load_config(Path(config_dir))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return 2
    if args.workers > 1 and args.worker_index is None:
        argv = ["--log-level", args.log_level, "--log-format", args.log_format, "serve", "--config", args.config]
        if args.host:
            argv += ["--host", args.host]
        if args.port is not None:
            argv += ["--port", str(args.port)]
        return supervise(worker_command(argv), args.workers)
    asyncio.run(run_sites(mediator_sites(config, args.host, args.port, args.worker_index)))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return 2
    print(f"{args.config}: configuration is valid ({len(config.channels.channels)} channels)")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from mediator.explain import described_principal, explain

    config = _load_or_report(args.config)
    if config is None:
        return 2
    try:
        principal = described_principal(args.claims, args.client, args.roles, args.facility, args.user,
                                        args.scopes, args.auth_method or ("access_token" if args.scopes else "mtls"))
        body = Path(args.body).read_bytes() if args.body else None
    except (OSError, ValueError) as exc:
        print(f"explain: {exc}", file=sys.stderr)
        return 2
    headers = dict(h.split(":", 1) for h in args.header)
    result = asyncio.run(explain(config, args.method, args.path, principal, body=body, client_ip=args.ip,
                                 headers={k.strip(): v.strip() for k, v in headers.items()}))
    print(f"{args.method.upper()} {args.path}")
    for line in result.lines():
        print(line)
    return 0 if result.final is None else 1


def cmd_sandbox(args: argparse.Namespace) -> int:
    from mediator.sandbox import build_sandbox_app

    asyncio.run(run_sites([Site(build_sandbox_app(), args.host, args.port, "sandbox")]))
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    """The sandbox and the mediator in one process: what `make run` starts."""
    from mediator.sandbox import build_sandbox_app

    config = _load_or_report(args.config)
    if config is None:
        return 2
    asyncio.run(run_sites([Site(build_sandbox_app(), "127.0.0.1", args.sandbox_port, "sandbox"),
                           *mediator_sites(config)]))
    return 0


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
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check", help="validate the configuration; errors as file:line:col, exit 2")
    check.add_argument("--config", required=True)
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
    explain.set_defaults(func=cmd_explain)
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
