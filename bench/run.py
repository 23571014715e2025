"""Mediator overhead against nginx, in one run on one machine (README "Benchmarks").

Starts, all on loopback and on free ports:
  * a fast openIMIS imitation (bench/upstream.py: login + a fixed small Bundle),
  * nginx as a pure reverse proxy in front of it (foreground, config and temp files in a temp dir),
  * a bare aiohttp pass-through proxy (bench/bare_proxy.py): the framework's own ceiling,
  * the mediator (`openimis-mediator serve`, with `--workers N` when the CLI has it) with every
    pipeline stage the installed mediator has (see FEATURES),
then drives each with the same closed-loop load (wrk), prints throughput and p50/p99 side by side
with the mediator/nginx ratios, and finally measures p99 latency at half of the mediator's
saturation throughput with a fixed-rate open-loop generator (bench/openloop.py) against the
upstream directly, nginx and the mediator: "added latency" is the difference to the direct path.

Usage: .venv/bin/python bench/run.py [--duration 10] [--connections 50] [--json out.json]
Every run is bounded: at most 60 s per measurement and a fixed number of measurements.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
FHIR_PATH = "/fhir/Medication/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------------
# Mediator configuration. Each pipeline feature that exists in the installed mediator adds its channel
# keys, policy files, environment and request headers here; adding a stage to the bench is one entry.
# ---------------------------------------------------------------------------------------------------

@dataclass
class Feature:
    name: str
    present: Callable[[set[str]], bool]
    """Given the installed mediator's POLICY_FILES keys and `server.*` field names (prefixed "server."):
    is this feature there?"""
    channel_yaml: str = ""
    server_yaml: str = ""
    """May use {metrics_port} and {run_id} (filled in per run)."""
    policies: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    prepare: Callable[[Path], None] | None = None
    """Writes further files (keys) into the mediator's configuration directory before it starts."""
    headers: Callable[[str], dict[str, str]] | None = None
    """Given the mediator's origin (it is running): request headers for one measurement. Called afresh
    before every measurement, so short-lived tokens stay valid for its whole duration."""


class BenchIdentity:
    """Keys made for this run: the HMS client's assertion key and the IdP that signs user tokens.
    The access token is a real one, from the mediator's own /auth/token (client assertion, RFC 7523)."""

    CLIENT_ID = "bench-hms"
    IDP_ISSUER = "https://idp.bench.invalid"

    def __init__(self) -> None:
        from joserfc.jwk import ECKey

        self.client_key = ECKey.generate_key("P-256")
        self.idp_key = ECKey.generate_key("P-256")
        self.signing_key = ECKey.generate_key("P-256")

    def write_keys(self, root: Path) -> None:
        folder = root / "keys"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "bench-hms.pem").write_bytes(self.client_key.as_pem(private=False))
        (folder / "idp.pem").write_bytes(self.idp_key.as_pem(private=False))
        signing = folder / "mediator-signing.key"
        signing.write_bytes(self.signing_key.as_pem(private=True))
        signing.chmod(0o600)

    def headers(self, origin: str) -> dict[str, str]:
        from joserfc import jwt

        from mediator.identity.client import client_assertion, token_form

        token_url = f"{origin}/auth/token"
        form = token_form(client_assertion(self.CLIENT_ID, self.client_key, token_url), "system/*.read")
        request = urllib.request.Request(token_url, data=urllib.parse.urlencode(form).encode(), method="POST",
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 (loopback, our own mediator)
            access_token = json.loads(resp.read())["access_token"]
        now = int(time.time())
        user_token = jwt.encode({"alg": "ES256"}, {
            "iss": self.IDP_ISSUER, "aud": f"{origin}/fhir/", "iat": now, "exp": now + 300,
            "preferred_username": "bench.user", "roles": ["hms"], "hf": "BENCH001"}, self.idp_key,
            algorithms=["ES256"])
        return {"Authorization": f"Bearer {access_token}", "X-User-Token": user_token}


BENCH_IDENTITY = BenchIdentity()


# Issue 9: the whole pipeline, as in production. Limits are set far above what the bench can send
# (1000 req/s per key with a burst of 1,000,000), so every request pays the Redis round trip and none
# is refused.
FEATURES: list[Feature] = [
    Feature(
        "ip_allowlist", lambda keys: "ip_allowlist" in keys,
        channel_yaml="ip_allowlist: [local]\n",
        policies={"ip_allowlist.yaml": """\
            version: 1
            trusted_proxies: []
            unlisted_channels: deny
            ip_sets:
              local:
                allow: ["127.0.0.0/8", "::1/128"]
                deny: ["127.255.255.254/32"]
            """},
    ),
    Feature(
        "authentication (access token from /auth/token + X-User-Token)", lambda keys: "clients" in keys,
        policies={"clients.yaml": f"""\
            version: 1
            token_service:
              signing_key_file: keys/mediator-signing.key
              access_token_lifetime_s: 600
            clients:
              {BenchIdentity.CLIENT_ID}:
                auth_methods: [private_key_jwt]
                keys:
                  public_key_file: keys/bench-hms.pem
                ip_allowlist: [local]
                health_facilities: [BENCH001]
                default_roles: [hms]
                scopes: [system/*.read]
                user_token:
                  required: true
                  issuer: {BenchIdentity.IDP_ISSUER}
                  keys:
                    public_key_file: keys/idp.pem
                  algorithms: [ES256]
                  max_lifetime_s: 600
                  claims:
                    user_id: preferred_username
                    roles: roles
                    health_facility: hf
            """},
        prepare=BENCH_IDENTITY.write_keys,
        headers=BENCH_IDENTITY.headers,
    ),
    # Master data is not facility-bound, so `facility_scope: any` says outright that no facility
    # lookup is needed (the facility directory is never loaded from the bench upstream).
    Feature(
        "authorization (master-data-read, facility_scope: any)", lambda keys: "authorization" in keys,
        policies={"authorization.yaml": """\
            version: 1
            facility_directory:
              upstream: openimis
            rules:
              - name: master-data-read
                roles: [hms]
                permissions: [system/Medication.rs, system/ActivityDefinition.rs, system/Organization.rs,
                              system/Location.rs]
                facility_scope: any
            """},
    ),
    # Required with authorization.yaml; the bench sends GETs, which carry no body for it to check.
    Feature(
        "write firewall (the shipped write profiles)", lambda keys: "write_profiles" in keys,
        policies={"write_profiles.yaml": (Path(__file__).parents[1] / "policies" / "write_profiles.yaml").read_text()},
    ),
    Feature(
        "rate limits (Redis, per client and per user)",
        lambda keys: "rate_limits" in keys and "server.redis" in keys,
        server_yaml="redis:\n  url: redis://127.0.0.1:6379/0\n  key_prefix: \"bench-{run_id}:\"\n",
        policies={"rate_limits.yaml": """\
            version: 1
            limits:
              - name: per-client
                per: [client]
                rate: 1000
                period_s: 1
                burst: 1000000
                on_store_error: deny
              - name: per-user
                per: [user]
                rate: 1000
                period_s: 1
                burst: 1000000
                on_store_error: deny
            """},
    ),
    Feature(
        "metrics listener", lambda keys: "server.metrics" in keys,
        server_yaml="metrics:\n  host: 127.0.0.1\n  port: {metrics_port}\n",
    ),
    Feature(
        "audit (file)", lambda keys: "server.audit" in keys,
        server_yaml="audit:\n  file: audit/audit.log\n",
    ),
]


def installed_policy_keys() -> set[str]:
    from mediator.config import POLICY_FILES
    from mediator.config.models import ServerConfig

    return set(POLICY_FILES) | {f"server.{name}" for name in ServerConfig.model_fields}


def write_mediator_config(root: Path, port: int, upstream_port: int, features: list[Feature],
                          fill: dict[str, str]) -> None:
    channel_extra = "".join(f.channel_yaml for f in features)
    server_extra = textwrap.indent("".join(f.server_yaml.format(**fill) for f in features), "  ")
    channels = f"""\
        version: 1
        server:
          listen:
            host: 127.0.0.1
            port: {port}
          public_base_url: http://127.0.0.1:{port}/fhir/
        {{server_extra}}upstreams:
          openimis:
            base_url: http://127.0.0.1:{upstream_port}/api/api_fhir_r4/
            pool_size: 128
            login:
              username_env: OPENIMIS_USERNAME
              password_env: OPENIMIS_PASSWORD
        channels:
          - name: master-data
            path: ^/fhir/(ActivityDefinition|Medication|Location|Organization)(/[^/]+)?/?$
            methods: [GET]
            upstream: openimis
        """
    text = textwrap.dedent(channels).replace("{server_extra}", server_extra) + textwrap.indent(channel_extra, "    ")
    (root / "policies").mkdir(parents=True, exist_ok=True)
    (root / "audit").mkdir(exist_ok=True)
    (root / "channels.yaml").write_text(text)
    for feature in features:
        for name, policy in feature.policies.items():
            (root / "policies" / name).write_text(textwrap.dedent(policy))
        if feature.prepare is not None:
            feature.prepare(root)


def request_headers(features: list[Feature], origin: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    for feature in features:
        if feature.headers is not None:
            headers.update(feature.headers(origin))
    return headers


def delete_redis_keys(prefix: str) -> int:
    """Only this run's keys (they also expire by themselves: GCRA keys carry a TTL)."""
    import redis

    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        return int(client.delete(*keys)) if keys else 0
    except redis.RedisError:
        return 0
    finally:
        client.close()


NGINX_CONF = """\
{user}worker_processes {workers};
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream openimis {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        location /fhir/ {{
            proxy_pass http://openimis/api/api_fhir_r4/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


# ---------------------------------------------------------------------------------------------------
# Processes: started by us, stopped by us (by pid), whatever happens.
# ---------------------------------------------------------------------------------------------------

class Processes:
    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        handle = log.open("wb")
        process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            if process.poll() is None:
                # SIGINT: every process here stops cleanly on it, and py-spy writes its profile.
                os.killpg(process.pid, signal.SIGINT)
        for process in reversed(self.started):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def wait_for_200(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args} exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready after {timeout_s}s ({last}):\n{log.read_text()[-2000:]}")


def cli_has_workers_flag() -> bool:
    out = subprocess.run([str(BIN / "openimis-mediator"), "serve", "--help"], capture_output=True,
                         text=True, check=True).stdout
    return "--workers" in out


# ---------------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------------

@dataclass
class Closed:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(text)
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def wrk(url: str, args: argparse.Namespace, headers: dict[str, str]) -> Closed:
    argv = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency"]
    for key, value in headers.items():
        argv += ["-H", f"{key}: {value}"]
    out = subprocess.run(argv + [url], capture_output=True, text=True, check=True,
                         timeout=args.duration + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses:\s+(\d+)",):
        found = re.search(pattern, out)
        errors += int(found.group(1)) if found else 0
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    return Closed(rps, p50, p99, errors)


def openloop(url: str, rate: float, args: argparse.Namespace, headers: dict[str, str]) -> dict[str, float]:
    argv = [sys.executable, str(HERE / "openloop.py"), "--url", url, "--rate", f"{rate:.0f}",
            "--duration", str(args.duration), "--connections", str(args.connections)]
    for key, value in headers.items():
        argv += ["--header", f"{key}: {value}"]
    out = subprocess.run(argv,
                         capture_output=True, text=True, check=True, timeout=args.duration + 60).stdout
    result: dict[str, float] = json.loads(out)
    return result


# ---------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement (max 60)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--workers", type=int, default=2, help="mediator and nginx worker processes")
    parser.add_argument("--rounds", type=int, default=1, help="closed-loop rounds per target (max 5); best kept")
    parser.add_argument("--log-level", default="INFO", help="mediator log level (INFO writes access logs)")
    parser.add_argument("--fixed-rate", type=float,
                        help="open-loop rate in req/s (default: half the mediator's saturation); to compare "
                             "two mediator versions at one rate")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--profile", type=Path,
                        help="run the mediator under py-spy, load only the mediator, write a flame graph (SVG)")
    args = parser.parse_args()
    if not 1 <= args.duration <= 60 or not 1 <= args.rounds <= 5 or not 1 <= args.connections <= 1000:
        parser.error("keep the load bounded: duration 1..60 s, rounds 1..5, connections 1..1000")
    if shutil.which("nginx") is None or shutil.which("wrk") is None:
        parser.error("needs nginx and wrk on PATH: `make bench` installs them (apt-get install nginx-light wrk)")

    keys = installed_policy_keys()
    features = [f for f in FEATURES if f.present(keys)]
    workers_flag = cli_has_workers_flag()
    mediator_workers = args.workers if workers_flag else 1
    env = dict(os.environ, OPENIMIS_USERNAME="bench", OPENIMIS_PASSWORD="bench")
    for feature in features:
        env.update(feature.env)
    run_id = uuid.uuid4().hex[:12]

    processes = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="mediator-bench-"))
    try:
        upstream_port, nginx_port, mediator_port, bare_port = free_port(), free_port(), free_port(), free_port()
        metrics_port = free_port()
        upstream = processes.start([sys.executable, str(HERE / "upstream.py"), "--port", str(upstream_port)],
                                   tmp / "upstream.log")
        nginx_user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(user=nginx_user, workers=args.workers, tmp=tmp,
                                                          upstream_port=upstream_port, port=nginx_port))
        nginx = processes.start(["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e",
                                 str(tmp / "nginx-error.log")], tmp / "nginx.log")
        config_dir = tmp / "mediator"
        write_mediator_config(config_dir, mediator_port, upstream_port, features,
                              {"metrics_port": str(metrics_port), "run_id": run_id})
        serve = [str(BIN / "openimis-mediator"), "--log-level", args.log_level, "serve", "--config",
                 str(config_dir)]
        if workers_flag:
            serve += ["--workers", str(mediator_workers)]
        if args.profile:
            serve = [str(BIN / "py-spy"), "record", "--subprocesses", "--rate", "250",
                     "--format", "raw" if args.profile.suffix == ".txt" else "flamegraph", "-o",
                     str(args.profile.resolve()), "--"] + serve
        mediator = processes.start(serve, tmp / "mediator.log", env=env)

        bare = processes.start([sys.executable, str(HERE / "bare_proxy.py"), "--port", str(bare_port),
                                "--upstream", f"http://127.0.0.1:{upstream_port}/api/api_fhir_r4/",
                                "--workers", str(mediator_workers)], tmp / "bare.log")
        urls = {"upstream": f"http://127.0.0.1:{upstream_port}/api/api_fhir_r4/Medication/",
                "nginx": f"http://127.0.0.1:{nginx_port}{FHIR_PATH}",
                "bare": f"http://127.0.0.1:{bare_port}{FHIR_PATH}",
                "mediator": f"http://127.0.0.1:{mediator_port}{FHIR_PATH}"}
        wait_for_200(urls["upstream"], upstream, tmp / "upstream.log")
        wait_for_200(urls["nginx"], nginx, tmp / "nginx.log")
        origin = f"http://127.0.0.1:{mediator_port}"
        wait_for_200(f"{origin}/healthz", mediator, tmp / "mediator.log")
        try:  # the full pipeline must admit the bench's requests before any load
            fetch(urls["mediator"], request_headers(features, origin))
        except OSError as exc:
            raise SystemExit(f"the mediator refused the bench request: {exc}\n"
                             f"{(tmp / 'mediator.log').read_text()[-3000:]}") from None
        wait_for_200(urls["bare"], bare, tmp / "bare.log")

        print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  {platform.node()}  {os.cpu_count()} CPUs  "
              f"load average {os.getloadavg()[0]:.2f}  Python {platform.python_version()}")
        print(f"# mediator: {mediator_workers} worker(s){'' if workers_flag else ' (serve has no --workers)'}; "
              f"stages from policies: {', '.join(f.name for f in features)}; log level {args.log_level}")
        print(f"# nginx {args.workers} workers; wrk -t{args.threads} -c{args.connections} "
              f"-d{args.duration}s GET {FHIR_PATH} (small searchset Bundle, {len(fetch(urls['upstream']))} B)")

        if args.profile:
            print(wrk(urls["mediator"], args, request_headers(features, origin)))
            return 0
        closed: dict[str, Closed] = {}
        for name in ("upstream", "nginx", "bare", "mediator"):
            # Every target gets the same request headers (same parsing work); fresh tokens each time.
            runs = [wrk(urls[name], args, request_headers(features, origin)) for _ in range(args.rounds)]
            closed[name] = max(runs, key=lambda r: r.rps)
        ng, bp, md = closed["nginx"], closed["bare"], closed["mediator"]
        rows = [("throughput (req/s)", ng.rps, bp.rps, md.rps),
                ("p50 latency (ms)", ng.p50_ms, bp.p50_ms, md.p50_ms),
                ("p99 latency (ms)", ng.p99_ms, bp.p99_ms, md.p99_ms)]
        print()
        print(f"closed loop (saturation), {args.connections} connections; upstream alone: "
              f"{closed['upstream'].rps:.0f} req/s, p99 {closed['upstream'].p99_ms:.2f} ms; "
              f"errors nginx {ng.errors}, bare {bp.errors}, mediator {md.errors}")
        print(f"| {'':20} | {'nginx':>9} | {'bare aiohttp':>12} | {'mediator':>9} | {'mediator/nginx':>14} | "
              f"{'mediator/bare':>13} |")
        print(f"|{'-' * 22}|{'-' * 11}|{'-' * 14}|{'-' * 11}|{'-' * 16}|{'-' * 15}|")
        for label, a, b, c in rows:
            print(f"| {label:20} | {a:9.2f} | {b:12.2f} | {c:9.2f} | {c / a:14.2f} | {c / b:13.2f} |")

        rate = args.fixed_rate or md.rps / 2
        fixed = {name: openloop(urls[name], rate, args, request_headers(features, origin))
                 for name in ("upstream", "nginx", "bare", "mediator")}
        print()
        print(f"fixed rate {rate:.0f} req/s ({'given' if args.fixed_rate else 'half of the mediator saturation'}), "
              f"open loop, {args.duration}s")
        print(f"| {'':10} | {'achieved':>9} | {'p50 ms':>8} | {'p99 ms':>8} | {'max ms':>8} | "
              f"{'p99 added vs direct':>19} | {'errors':>6} |")
        print(f"|{'-' * 12}|{'-' * 11}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 21}|{'-' * 8}|")
        for name, result in fixed.items():
            added = result["p99_ms"] - fixed["upstream"]["p99_ms"]
            print(f"| {name:10} | {result['achieved_rate']:9.0f} | {result['p50_ms']:8.2f} | "
                  f"{result['p99_ms']:8.2f} | {result['max_ms']:8.2f} | {added:19.2f} | {result['errors']:6.0f} |")
        added_p99 = fixed["mediator"]["p99_ms"] - fixed["upstream"]["p99_ms"]
        ratio = md.rps / ng.rps
        print()
        print(f"targets: throughput mediator/nginx {ratio:.2f} (>= 0.5: {'met' if ratio >= 0.5 else 'NOT met'}); "
              f"p99 added at {rate:.0f} req/s {added_p99:.2f} ms (<= 2 ms: {'met' if added_p99 <= 2 else 'NOT met'})")
        if args.json:
            args.json.write_text(json.dumps({
                "closed": {k: vars(v) for k, v in closed.items()}, "fixed_rate": rate, "fixed": fixed,
                "mediator_workers": mediator_workers, "features": [f.name for f in features],
                "load_average": os.getloadavg()}, indent=2))
        if any(c.errors for c in closed.values()) or any(f["errors"] for f in fixed.values()):
            print("ERRORS during the run: figures are not valid", file=sys.stderr)
            return 1
        return 0
    finally:
        processes.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        if any("rate limits" in f.name for f in features):
            delete_redis_keys(f"bench-{run_id}:")


def fetch(url: str, headers: dict[str, str] | None = None) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as resp:
        body: bytes = resp.read()
        return body


if __name__ == "__main__":
    sys.exit(main())
