"""Mediator CPU and latency against a bare aiohttp proxy and nginx, in one run on one machine (README
"Benchmarks").

Starts, all on loopback and on free ports, each in its own session: a fast openIMIS imitation
(bench/upstream.py), nginx as a pure reverse proxy, the bare aiohttp pass-through proxy
(bench/bare_proxy.py; also on uvloop and with TLS + client certificates), and `openimis-mediator serve
--workers N` with every pipeline stage the installed mediator has (FEATURES), plain and behind TLS with
client certificates (an nginx TLS client in front, since wrk and h2load present none). Optionally the
mediator of another checkout (`--baseline-src`) and the levers of issue 18 (`--levers`) in the same run.

Requests carry a stated token mix (every N-th user token fresh, the others repeated). Closed loop: wrk at
saturation, interleaved rounds; CPU µs per request of each target's processes from /proc. Open loop:
staggered single-connection h2load processes at half the mediator's saturation; p99 added against the
direct path. Load averages per measurement; `--json` for CI.

Usage: .venv/bin/python bench/run.py [--duration 6] [--rounds 3] [--levers] [--baseline-src DIR] [--json F]
Every run is bounded: at most 60 s per measurement and a fixed list of measurements.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import platform
import re
import resource
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
    The access token is a real one, from the mediator's own /auth/token (client assertion, RFC 7523);
    user tokens are ES256 tokens of the client's `user_token` issuer, a stated mix (see `user_tokens`)."""

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

    def access_token(self, origin: str) -> str:
        from mediator.identity.client import client_assertion, token_form

        token_url = f"{origin}/auth/token"
        form = token_form(client_assertion(self.CLIENT_ID, self.client_key, token_url), "system/*.read")
        request = urllib.request.Request(token_url, data=urllib.parse.urlencode(form).encode(), method="POST",
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 (loopback, our own mediator)
            return str(json.loads(resp.read())["access_token"])

    def user_token(self, audience: str, user: str) -> str:
        from joserfc import jwt

        now = int(time.time())
        return jwt.encode({"alg": "ES256"}, {
            "iss": self.IDP_ISSUER, "aud": audience, "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex,
            "preferred_username": user, "roles": ["hms"], "hf": "BENCH001"}, self.idp_key, algorithms=["ES256"])

    def headers(self, origin: str) -> dict[str, str]:
        """One request's headers with a repeated user token (what `--fresh-every 0` sends)."""
        return {"Authorization": f"Bearer {self.access_token(origin)}",
                "X-User-Token": self.user_token(f"{origin}/fhir/", "bench.user.0")}


@dataclass
class TokenMix:
    """The user tokens of one measurement: `repeated` tokens of returning users (an HMS sends a signed-in
    user's token with every request of the session), and every `fresh_every`-th request a token never
    sent before (a user who just signed in: the mediator verifies its ES256 signature)."""

    repeated: list[str]
    fresh: list[str]
    fresh_every: int

    def describe(self) -> str:
        if not self.fresh_every:
            return f"{len(self.repeated)} repeated user tokens, none fresh"
        return (f"1 request in {self.fresh_every} with a fresh user token (never seen before), the others one of "
                f"{len(self.repeated)} repeated user tokens")


def make_token_mix(audience: str, repeated_users: int, fresh_every: int, fresh_count: int) -> TokenMix:
    repeated = [BENCH_IDENTITY.user_token(audience, f"bench.user.{i}") for i in range(repeated_users)]
    fresh = [BENCH_IDENTITY.user_token(audience, f"bench.new.{uuid.uuid4().hex[:10]}")
             for _ in range(fresh_count if fresh_every else 0)]
    return TokenMix(repeated, fresh, fresh_every)


WRK_SCRIPT = """-- written by bench/run.py: per-request headers (the token mix); one wrk thread, so one counter
local repeated = {{{repeated}}}
local fresh = {{{fresh}}}
local fresh_every = {fresh_every}
local authorization = {authorization}
local i, f = 0, 0
request = function()
  i = i + 1
  local user
  if fresh_every > 0 and i % fresh_every == 0 and f < #fresh then
    f = f + 1
    user = fresh[f]
  else
    user = repeated[(i % #repeated) + 1]
  end
  local headers = {{["Accept"] = "application/fhir+json", ["X-User-Token"] = user}}
  if authorization then headers["Authorization"] = authorization end
  return wrk.format("GET", "{path}", headers)
end
"""


def wrk_script(mix: TokenMix, authorization: str | None, path: str) -> str:
    def lua_list(items: list[str]) -> str:
        return ",".join(json.dumps(t) for t in items)

    return WRK_SCRIPT.format(repeated=lua_list(mix.repeated), fresh=lua_list(mix.fresh),
                             fresh_every=mix.fresh_every,
                             authorization=json.dumps(authorization) if authorization else "nil", path=path)


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
                auth_methods: [mtls, private_key_jwt]
                certificates:
                  - subject_cn: bench-hms
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


RECONCILE_YAML = "reconcile:\n  interval_ms: 50\n  max_stale_s: 2\n"


def write_mediator_config(root: Path, port: int, upstream_port: int, features: list[Feature],
                          fill: dict[str, str], tls: Path | None = None, reconcile: bool = False) -> None:
    """`tls`: a folder with server.crt/key and ca.crt: the listener terminates TLS and requires a client
    certificate (production's mTLS setup); the bench client then authenticates by its certificate."""
    channel_extra = "".join(f.channel_yaml for f in features)
    server_extra = textwrap.indent("".join(f.server_yaml.format(**fill) for f in features), "  ")
    listen_tls = "" if tls is None else (
        f"    tls:\n      cert_file: {tls / 'server.crt'}\n      key_file: {tls / 'server.key'}\n"
        f"      client_ca_file: {tls / 'ca.crt'}\n      require_client_cert: true\n")
    scheme = "https" if tls is not None else "http"
    channels = f"""\
        version: 1
        server:
          listen:
            host: 127.0.0.1
            port: {port}
        {{listen_tls}}  public_base_url: {scheme}://127.0.0.1:{port}/fhir/
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
    text = textwrap.dedent(channels).replace("{listen_tls}", listen_tls).replace("{server_extra}", server_extra) \
        + textwrap.indent(channel_extra, "    ")
    (root / "policies").mkdir(parents=True, exist_ok=True)
    (root / "audit").mkdir(exist_ok=True)
    (root / "channels.yaml").write_text(text)
    for feature in features:
        for name, policy in feature.policies.items():
            text = textwrap.dedent(policy)
            if name == "rate_limits.yaml" and reconcile:
                text += RECONCILE_YAML
            (root / "policies" / name).write_text(text)
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
{tls_fronts}}}
"""

# The TLS client of the mTLS variant: a plain listener the load generator hits, proxied over TLS with the
# bench client's certificate to a TLS target, keep-alive (an HMS keeps its connections; a handshake per
# request would be a different benchmark). wrk and h2load cannot present a client certificate.
TLS_FRONT = """\
    upstream {name} {{
        server 127.0.0.1:{target_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass https://{name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_certificate {pki}/bench-hms.crt;
            proxy_ssl_certificate_key {pki}/bench-hms.key;
            proxy_ssl_trusted_certificate {pki}/ca.crt;
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_session_reuse on;
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


def process_group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of every live process in a process group (each target is started in its
    own session: a supervisor and its workers, nginx's master and workers), from /proc/<pid>/stat."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after "(comm)": state ppid pgrp session … utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def redis_server_pid() -> int | None:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if Path(f"/proc/{entry.name}/comm").read_text().strip() == "redis-server":
                    return int(entry.name)
            except OSError:
                continue
    return None


def pid_cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
class Target:
    """What one column measures: the URL the load generator hits and the processes whose CPU is its cost."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    script: Path
    """wrk Lua script: the request headers (token mix) for this target."""
    open_headers: dict[str, str]
    """h2load headers (fixed per run: a repeated user token)."""
    tls_front: bool = False


def _generator_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _sample(target: Target, redis_pid: int | None, front_pgid: int | None) -> tuple[float, float, float, float]:
    return (process_group_cpu_s(target.process.pid), pid_cpu_s(redis_pid),
            process_group_cpu_s(front_pgid) if target.tls_front and front_pgid else 0.0, _generator_cpu())


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(text)
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def closed_loop(target: Target, args: argparse.Namespace, redis_pid: int | None,
                front_pgid: int | None) -> dict[str, float]:
    """wrk at saturation (-t1, one Lua state for the token mix); CPU µs per request of the target's
    processes, of Redis (shared with whatever else runs on the machine) and of the TLS front."""
    argv = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency", "-s", str(target.script),
            target.url]
    load_before = os.getloadavg()[0]
    before, wall = _sample(target, redis_pid, front_pgid), time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=args.duration + 30).stdout
    after, wall = _sample(target, redis_pid, front_pgid), time.perf_counter() - wall
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    found = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors += int(found.group(1)) if found else 0
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    per = 1e6 / max(requests, 1)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "requests": requests, "errors": errors,
        "p50_ms": _ms(re.search(r"\s50%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        "p99_ms": _ms(re.search(r"\s99%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        "cpu_us_per_request": round((after[0] - before[0]) * per, 1),
        "redis_cpu_us_per_request": round((after[1] - before[1]) * per, 1),
        "tls_front_cpu_us_per_request": round((after[2] - before[2]) * per, 1),
        "target_cores_busy": round((after[0] - before[0]) / wall, 2),
        "generator_cpu_pct_of_core": round(100 * (after[3] - before[3]) / wall, 1),
        "load_average": round((load_before + os.getloadavg()[0]) / 2, 2),
    }


def open_loop(target: Target, rate: float, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """A fixed request rate from `--open-connections` h2load processes (nghttp2, C), one connection each at
    rate/K requests per second, started evenly spread over one request interval. (One h2load with K
    clients ticks all its clients together: K requests arrive at once every K/rate s, a burst that
    measures queueing behind the burst, not the mediator at that rate.) HTTP/1.1 without pipelining, so a
    connection whose answer is late sends its next request late: `late_sends` counts the requests whose
    latency exceeded the per-connection interval (those that could have delayed the next one). Latency
    percentiles from h2load's per-request logs (--log-file); `burst_max_1ms`: the most requests started
    within one millisecond (the spread achieved)."""
    connections = args.open_connections
    per_connection = rate / connections
    interval_s = 1 / per_connection
    headers: list[str] = []
    for key, value in target.open_headers.items():
        headers += ["-H", f"{key}: {value}"]
    load_before = os.getloadavg()[0]
    generator_before, wall = _generator_cpu(), time.perf_counter()
    running: list[tuple[subprocess.Popen[str], Path]] = []
    first = time.perf_counter()
    for k in range(connections):
        log = tmp / f"h2load-{target.name}-{k}.log"
        log.unlink(missing_ok=True)
        delay = first + k * interval_s / connections - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        running.append((subprocess.Popen(
            ["h2load", "--h1", "-t1", "-c1", f"--rps={per_connection:.4f}", f"-D{args.duration}",
             "--warm-up-time=1", f"--log-file={log}", *headers, target.url],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), log))
    rows: list[list[str]] = []
    failed = 0
    for process, log in running:
        out, _ = process.communicate(timeout=args.duration + 30)
        if not re.search(r"requests: \d+ total, \d+ started, \d+ done, \d+ succeeded", out):
            failed += 1
        rows += [line.split("\t") for line in log.read_text().splitlines() if line.count("\t") >= 2]
    generator_cpu, wall = _generator_cpu() - generator_before, time.perf_counter() - wall
    latencies = sorted(int(r[2]) / 1000 for r in rows if r[1] != "-1")
    errors = sum(1 for r in rows if r[1] != "200") + failed
    starts = sorted(int(r[0]) for r in rows)
    span_s = (starts[-1] - starts[0]) / 1e6 if len(starts) > 1 else float(args.duration)
    burst = 0
    low = 0
    for high, start in enumerate(starts):
        while start - starts[low] >= 1000:
            low += 1
        burst = max(burst, high - low + 1)

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) if latencies else -1.0

    return {"rate": round(rate, 1), "achieved_rate": round(len(latencies) / span_s, 1),
            "count": len(latencies), "errors": errors,
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
            "max_ms": round(latencies[-1], 3) if latencies else -1.0,
            "late_sends": sum(1 for v in latencies if v > interval_s * 1000),
            "burst_max_1ms": burst,
            # K processes of one thread each: the share of the machine's cores they used
            "generator_cpu_pct_of_core": round(100 * generator_cpu / wall, 1),
            "load_average": round((load_before + os.getloadavg()[0]) / 2, 2)}


# ---------------------------------------------------------------------------------------------------

def median_round(runs: list[dict[str, float]]) -> dict[str, float]:
    """The round with the median CPU per request; every round's CPU figure is kept alongside."""
    ordered = sorted(runs, key=lambda r: r["cpu_us_per_request"])
    median = dict(ordered[len(ordered) // 2])
    median["cpu_us_per_request_rounds"] = [r["cpu_us_per_request"] for r in runs]  # type: ignore[assignment]
    median["errors"] = sum(r["errors"] for r in runs)
    return median


def bare_for(name: str, tls: bool, closed: dict[str, dict[str, float]]) -> str:
    """The bare proxy a target is compared with: same TLS, same event loop."""
    if tls:
        return "bare-tls"
    return "bare-uvloop" if "uvloop" in name and "bare-uvloop" in closed else "bare"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=8, help="seconds per measurement (max 60)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (closed loop)")
    parser.add_argument("--open-connections", type=int, default=16,
                        help="h2load processes of one connection each (open loop)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="closed-loop rounds, interleaved across targets (ABAB…); the median CPU/request "
                             "and throughput are kept (max 5)")
    parser.add_argument("--workers", type=int, default=2, help="mediator, bare proxy and nginx worker processes")
    parser.add_argument("--log-level", default="INFO", help="mediator log level (INFO writes access logs)")
    parser.add_argument("--fresh-every", type=int, default=10,
                        help="every N-th request carries a fresh user token (0: none); the others one of "
                             "--repeated-users repeated tokens")
    parser.add_argument("--repeated-users", type=int, default=50)
    parser.add_argument("--variants", default="plain,mtls",
                        help="plain: HTTP, access token + user token; mtls: TLS with a client certificate + "
                             "user token (through an nginx TLS client)")
    parser.add_argument("--baseline-src", type=Path,
                        help="a checkout of another mediator version (e.g. `git worktree add --detach /tmp/base "
                             "main`): measured as `before` in the same run, from the same venv")
    parser.add_argument("--compare", action="append", default=[], metavar="LABEL=DIR",
                        help="another checkout measured in the same run as target LABEL, with exactly the "
                             "configuration of `mediator` (reconciled rate limits unless --rate-limits per-request); "
                             "repeatable: one worktree per lever, in the order given, for what each lever gives")
    parser.add_argument("--rate-limits", choices=("reconciled", "per-request"), default="reconciled",
                        help="the mediator's rate-limit mode: reconciled (policy `reconcile:`, decided locally) or "
                             "per-request (one Redis round trip per request)")
    parser.add_argument("--levers", action="store_true",
                        help="also measure, in the same run, the mediator with per-request rate limits and with "
                             "--event-loop uvloop (what each lever gives)")
    parser.add_argument("--fixed-rate", type=float,
                        help="open-loop rate in req/s (default: half the mediator's saturation, per variant)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--profile", type=Path,
                        help="run the mediator under py-spy, load only the mediator, write a flame graph (SVG)")
    args = parser.parse_args()
    if not 1 <= args.duration <= 60 or not 1 <= args.connections <= 1000 or not 1 <= args.open_connections <= 64 \
            or not 1 <= args.rounds <= 5:
        parser.error("keep the load bounded: duration 1..60 s, connections 1..1000, open connections 1..64, "
                     "rounds 1..5")
    variants = set(args.variants.split(","))
    compared: list[tuple[str, Path]] = []
    for item in args.compare:
        label, _, folder = item.partition("=")
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,30}", label) or not folder or not Path(folder, "mediator").is_dir() \
                or label in ("before", "mediator", "bare", "nginx", "upstream") or label.startswith("mediator-"):
            parser.error(f"--compare {item}: LABEL=DIR, LABEL lower-case (not a built-in target name), DIR a checkout")
        compared.append((label, Path(folder)))
    if not variants <= {"plain", "mtls"}:
        parser.error("--variants: plain and/or mtls")
    for tool, package in (("nginx", "nginx-light"), ("wrk", "wrk"), ("h2load", "nghttp2-client")):
        if shutil.which(tool) is None:
            parser.error(f"needs {tool} on PATH: `make bench` installs it (apt-get install {package})")

    keys = installed_policy_keys()
    features = [f for f in FEATURES if f.present(keys)]
    env = dict(os.environ, OPENIMIS_USERNAME="bench", OPENIMIS_PASSWORD="bench")
    for feature in features:
        env.update(feature.env)
    run_id = uuid.uuid4().hex[:12]

    processes = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="mediator-bench-"))
    try:
        upstream_port, nginx_port, bare_port = free_port(), free_port(), free_port()
        upstream = processes.start([sys.executable, str(HERE / "upstream.py"), "--port", str(upstream_port)],
                                   tmp / "upstream.log")
        upstream_base = f"http://127.0.0.1:{upstream_port}/api/api_fhir_r4/"
        pki = tmp / "pki"
        subprocess.run([str(BIN / "openimis-mediator"), "certs", "--out", str(pki), "--client", "bench-hms"],
                       check=True, capture_output=True)

        def start_mediator(name: str, tls: bool, extra: list[str], source: Path | None,
                           reconcile: bool) -> tuple[subprocess.Popen[bytes], int]:
            port = free_port()
            root = tmp / name
            write_mediator_config(root, port, upstream_port, features,
                                  {"metrics_port": str(free_port()), "run_id": run_id}, pki if tls else None,
                                  reconcile)
            argv = [sys.executable, "-m", "mediator", "--log-level", args.log_level, "serve", "--config",
                    str(root), "--workers", str(args.workers)] + extra
            if args.profile and name == "mediator":
                argv = [str(BIN / "py-spy"), "record", "--subprocesses", "--rate", "250", "--format",
                        "raw" if args.profile.suffix == ".txt" else "flamegraph", "-o", str(args.profile.resolve()),
                        "--"] + argv
            menv = dict(env, PYTHONPATH=str(source.resolve())) if source is not None else env
            return processes.start(argv, tmp / f"{name}.log", env=menv), port

        mediators: dict[str, tuple[subprocess.Popen[bytes], int, bool]] = {}
        reconciled = args.rate_limits == "reconciled"
        plan: list[tuple[str, bool, list[str], Path | None, bool]] = []
        for variant in ("plain", "mtls"):
            if variant not in variants:
                continue
            tls = variant == "mtls"
            suffix = "-mtls" if tls else ""
            if args.baseline_src is not None and not tls:
                plan.append(("before", tls, [], args.baseline_src, False))  # its policy schema has no reconcile
            if not tls:
                for label, source in compared:
                    plan.append((label, tls, [], source, reconciled))
            plan.append(("mediator" + suffix, tls, [], None, reconciled))
            if args.levers and not tls:
                if reconciled:
                    plan.append(("mediator-rl-per-request", tls, [], None, False))
                plan.append(("mediator-uvloop", tls, ["--event-loop", "uvloop"], None, reconciled))
        for name, tls, extra, source, reconcile in plan:
            process, port = start_mediator(name, tls, extra, source, reconcile)
            mediators[name] = (process, port, tls)
        bare = processes.start([sys.executable, str(HERE / "bare_proxy.py"), "--port", str(bare_port),
                                "--upstream", upstream_base, "--workers", str(args.workers)], tmp / "bare.log")
        bare_uv_port = free_port()
        bare_uv = processes.start([sys.executable, str(HERE / "bare_proxy.py"), "--port", str(bare_uv_port),
                                   "--upstream", upstream_base, "--workers", str(args.workers), "--uvloop"],
                                  tmp / "bare-uvloop.log") if args.levers and "plain" in variants else None
        bare_tls_port = free_port()
        bare_tls = processes.start([sys.executable, str(HERE / "bare_proxy.py"), "--port", str(bare_tls_port),
                                    "--upstream", upstream_base, "--workers", str(args.workers), "--tls",
                                    str(pki / "server.crt"), str(pki / "server.key"), str(pki / "ca.crt")],
                                   tmp / "bare-tls.log") if "mtls" in variants else None
        fronts: dict[str, int] = {}
        tls_targets = {name: port for name, (_, port, tls) in mediators.items() if tls}
        if bare_tls is not None:
            tls_targets["bare-tls"] = bare_tls_port
        front_conf = ""
        for name, port in tls_targets.items():
            fronts[name] = free_port()
            front_conf += TLS_FRONT.format(name=name.replace("-", "_"), target_port=port, port=fronts[name], pki=pki)
        nginx_user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(user=nginx_user, workers=args.workers, tmp=tmp,
                                                          upstream_port=upstream_port, port=nginx_port,
                                                          tls_fronts=""))
        nginx = processes.start(["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e",
                                 str(tmp / "nginx-error.log")], tmp / "nginx.log")
        front = None
        if front_conf:
            front_tmp = tmp / "front"
            front_tmp.mkdir()
            (front_tmp / "nginx.conf").write_text(
                NGINX_CONF.format(user=nginx_user, workers=1, tmp=front_tmp, upstream_port=upstream_port,
                                  port=free_port(), tls_fronts=front_conf))
            front = processes.start(["nginx", "-p", str(front_tmp), "-c", str(front_tmp / "nginx.conf"), "-e",
                                     str(front_tmp / "nginx-error.log")], tmp / "front.log")

        wait_for_200(upstream_base + "Medication/", upstream, tmp / "upstream.log")
        wait_for_200(f"http://127.0.0.1:{nginx_port}{FHIR_PATH}", nginx, tmp / "nginx.log")
        wait_for_200(f"http://127.0.0.1:{bare_port}{FHIR_PATH}", bare, tmp / "bare.log")
        for name, (process, port, tls) in mediators.items():
            if tls:
                assert front is not None
                wait_for_200(f"http://127.0.0.1:{fronts[name]}/healthz", front, tmp / "front.log")
            else:
                wait_for_200(f"http://127.0.0.1:{port}/healthz", process, tmp / f"{name}.log")

        fresh_count = int(args.duration * 6000 / args.fresh_every) if args.fresh_every else 0
        started = time.perf_counter()
        mixes = {"plain": make_token_mix("", 0, 0, 0), "mtls": make_token_mix("", 0, 0, 0)}
        # Each mediator checks `aud` against its own public base URL: one token mix per mediator port.
        scripts: dict[str, Path] = {}
        open_headers: dict[str, dict[str, str]] = {}
        for name, (_, port, tls) in mediators.items():
            audience = f"{'https' if tls else 'http'}://127.0.0.1:{port}/fhir/"
            mix = make_token_mix(audience, args.repeated_users, args.fresh_every, fresh_count)
            mixes["mtls" if tls else "plain"] = mix
            # The access token's issuer is the mediator's own origin: one per mediator.
            authorization = None if tls else f"Bearer {BENCH_IDENTITY.access_token(f'http://127.0.0.1:{port}')}"
            scripts[name] = tmp / f"{name}.lua"
            scripts[name].write_text(wrk_script(mix, authorization, FHIR_PATH))
            open_headers[name] = {"X-User-Token": mix.repeated[0]}
            if authorization:
                open_headers[name]["Authorization"] = authorization
        token_seconds = time.perf_counter() - started
        # The proxies get the same headers as the mediator of their variant (same parsing work).
        any_plain = next((n for n, (_, _, t) in mediators.items() if not t), None)
        any_tls = next((n for n, (_, _, t) in mediators.items() if t), None)
        for name, process, tls in (("upstream", upstream, False), ("nginx", nginx, False), ("bare", bare, False),
                                   ("bare-uvloop", bare_uv, False), ("bare-tls", bare_tls, True)):
            source = any_tls if tls else any_plain
            if process is not None and source is not None:
                scripts[name], open_headers[name] = tmp / f"{name}.lua", open_headers[source]
                path = "/api/api_fhir_r4/Medication/" if name == "upstream" else FHIR_PATH
                scripts[name].write_text(scripts[source].read_text().replace(f'"{FHIR_PATH}"', f'"{path}"'))
        for name, (_, port, tls) in mediators.items():
            url = f"http://127.0.0.1:{fronts[name]}{FHIR_PATH}" if tls else f"http://127.0.0.1:{port}{FHIR_PATH}"
            try:  # the full pipeline must admit the bench's requests before any load
                fetch(url, open_headers[name])
            except OSError as exc:
                raise SystemExit(f"{name} refused the bench request: {exc}\n"
                                 f"{(tmp / f'{name}.log').read_text()[-3000:]}") from None

        targets: dict[str, Target] = {}
        if "plain" in variants:
            targets["upstream"] = Target("upstream", upstream_base + "Medication/", upstream, scripts["upstream"],
                                         open_headers["upstream"])
            targets["nginx"] = Target("nginx", f"http://127.0.0.1:{nginx_port}{FHIR_PATH}", nginx, scripts["nginx"],
                                      open_headers["nginx"])
            targets["bare"] = Target("bare", f"http://127.0.0.1:{bare_port}{FHIR_PATH}", bare, scripts["bare"],
                                     open_headers["bare"])
            if bare_uv is not None:
                wait_for_200(f"http://127.0.0.1:{bare_uv_port}{FHIR_PATH}", bare_uv, tmp / "bare-uvloop.log")
                targets["bare-uvloop"] = Target("bare-uvloop", f"http://127.0.0.1:{bare_uv_port}{FHIR_PATH}", bare_uv,
                                                scripts["bare-uvloop"], open_headers["bare-uvloop"])
        for name, (process, port, tls) in mediators.items():
            if not tls:
                targets[name] = Target(name, f"http://127.0.0.1:{port}{FHIR_PATH}", process, scripts[name],
                                       open_headers[name])
        if bare_tls is not None:
            targets["bare-tls"] = Target("bare-tls", f"http://127.0.0.1:{fronts['bare-tls']}{FHIR_PATH}", bare_tls,
                                         scripts["bare-tls"], open_headers["bare-tls"], tls_front=True)
        for name, (process, _, tls) in mediators.items():
            if tls:
                targets[name] = Target(name, f"http://127.0.0.1:{fronts[name]}{FHIR_PATH}", process, scripts[name],
                                       open_headers[name], tls_front=True)

        header = {
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "workers": args.workers, "features": [f.name for f in features], "log_level": args.log_level,
            "token_mix": {v: mixes[v].describe() for v in sorted(variants)},
            "token_generation_s": round(token_seconds, 2),
            "bundle_bytes": len(fetch(upstream_base + "Medication/")),
        }
        print(f"# {header['started']}  {header['host']}  {header['cpus']} CPUs  load average "
              f"{' '.join(map(str, header['load_average_at_start']))}  Python {header['python']}")
        print(f"# {args.workers} worker process(es) per proxy; mediator stages: {', '.join(header['features'])}; "
              f"log level {args.log_level}")
        for variant in sorted(variants):
            print(f"# {variant}: {header['token_mix'][variant]}")
        print(f"# closed loop: wrk -t1 -c{args.connections} -d{args.duration}s, {args.rounds} interleaved round(s), "
              f"median kept; open loop: {args.open_connections} × h2load --h1 -c1 --rps (C, staggered), "
              f"-D{args.duration}; GET {FHIR_PATH} "
              f"(searchset Bundle, {header['bundle_bytes']} B)")
        if args.profile:
            print(closed_loop(targets["mediator"], args, None, None))
            return 0

        redis_pid = redis_server_pid()
        front_pgid = front.pid if front is not None else None
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for _ in range(args.rounds):  # interleaved: every target sees the machine's ups and downs alike
            for name, target in targets.items():
                rounds[name].append(closed_loop(target, args, redis_pid, front_pgid))
        closed = {name: median_round(runs) for name, runs in rounds.items()}
        print()
        print("closed loop (saturation): throughput, latency, CPU per request of the target's own processes")
        print(f"| {'target':22} | {'req/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | {'CPU µs/req':>10} | "
              f"{'× bare':>6} | {'Redis µs/req':>12} | {'TLS front µs/req':>16} | {'wrk CPU %':>9} | "
              f"{'load':>5} | {'errors':>6} |")
        print("|" + "|".join("-" * (w + 2) for w in (22, 8, 7, 7, 10, 6, 12, 16, 9, 5, 6)) + "|")
        for name, r in closed.items():
            base = closed.get(bare_for(name, targets[name].tls_front, closed))
            ratio = r["cpu_us_per_request"] / base["cpu_us_per_request"] if base else float("nan")
            print(f"| {name:22} | {r['rps']:8.0f} | {r['p50_ms']:7.2f} | {r['p99_ms']:7.2f} | "
                  f"{r['cpu_us_per_request']:10.0f} | {ratio:6.2f} | {r['redis_cpu_us_per_request']:12.0f} | "
                  f"{r['tls_front_cpu_us_per_request']:16.0f} | {r['generator_cpu_pct_of_core']:9.0f} | "
                  f"{r['load_average']:5.2f} | {r['errors']:6.0f} |")

        fixed: dict[str, dict[str, float]] = {}
        rates: dict[str, float] = {}
        for variant, mediator_name, names in (
                ("plain", "mediator", [n for n, t in targets.items() if not t.tls_front]),
                ("mtls", "mediator-mtls", [n for n, t in targets.items() if t.tls_front])):
            if variant not in variants:
                continue
            rates[variant] = args.fixed_rate or closed[mediator_name]["rps"] / 2
            for name in names:
                fixed[name] = open_loop(targets[name], rates[variant], args, tmp)
        print()
        print(f"open loop at a fixed rate ({'given' if args.fixed_rate else 'half the mediator saturation'}: "
              + ", ".join(f"{v} {r:.0f} req/s" for v, r in rates.items()) + f"), {args.duration}s")
        print(f"| {'target':22} | {'rate':>6} | {'achieved':>8} | {'p50 ms':>7} | {'p99 ms':>7} | {'max ms':>7} | "
              f"{'p99 added':>9} | {'late':>5} | {'burst/ms':>8} | {'h2load CPU %':>12} | {'load':>5} | "
              f"{'errors':>6} |")
        print("|" + "|".join("-" * (w + 2) for w in (22, 6, 8, 7, 7, 7, 9, 5, 8, 12, 5, 6)) + "|")
        for name, r in fixed.items():
            reference = fixed.get("bare-tls" if targets[name].tls_front else "upstream")
            added = r["p99_ms"] - reference["p99_ms"] if reference else float("nan")
            r["p99_added_ms"] = round(added, 3)
            print(f"| {name:22} | {r['rate']:6.0f} | {r['achieved_rate']:8.0f} | {r['p50_ms']:7.2f} | "
                  f"{r['p99_ms']:7.2f} | {r['max_ms']:7.2f} | {added:9.2f} | {r['late_sends']:5.0f} | "
                  f"{r['burst_max_1ms']:8.0f} | {r['generator_cpu_pct_of_core']:12.0f} | {r['load_average']:5.2f} | "
                  f"{r['errors']:6.0f} |")
        print("(p99 added: plain targets against the upstream direct, mTLS targets against bare-tls through the "
              "same TLS front)")

        targets_met: dict[str, dict[str, object]] = {}
        for mediator_name, (_, _, tls) in mediators.items():
            bare_name = bare_for(mediator_name, tls, closed)
            if mediator_name in closed and bare_name in closed:
                ratio = closed[mediator_name]["cpu_us_per_request"] / closed[bare_name]["cpu_us_per_request"]
                added = fixed[mediator_name]["p99_added_ms"]
                targets_met[mediator_name] = {"cpu_ratio_to_bare": round(ratio, 2), "cpu_met": ratio <= 2,
                                              "p99_added_ms": added, "p99_met": added <= 2}
        print()
        for name, t in targets_met.items():
            print(f"targets, {name}: CPU per request {t['cpu_ratio_to_bare']:.2f}× bare (<= 2: "
                  f"{'met' if t['cpu_met'] else 'NOT met'}); p99 added at half saturation {t['p99_added_ms']:.2f} ms "
                  f"(<= 2 ms: {'met' if t['p99_met'] else 'NOT met'})")
        if compared:
            print()
            print("compared checkouts (same run, same configuration as `mediator`): CPU µs per request, the change "
                  "to the previous row, throughput")
            previous = None
            for name in [label for label, _ in compared] + ["mediator"]:
                value = closed[name]["cpu_us_per_request"]
                change = f"{value - previous:+.0f}" if previous is not None else ""
                ratio = value / closed["bare"]["cpu_us_per_request"]
                rps = closed[name]["rps"]
                print(f"  {name:25} {value:7.0f} µs/req {change:>7}  {ratio:5.2f}× bare  {rps:6.0f} req/s "
                      f"({rps / closed['bare']['rps']:.2f}× bare)  p99 added at half saturation "
                      f"{fixed[name]['p99_added_ms']:.2f} ms")
                previous = value
        if args.levers or args.baseline_src:
            print()
            print("levers (same run): CPU µs per request of the mediator's processes, and the change")
            steps = [("before", "main (baseline)"), ("mediator-rl-per-request", "+ audit/access background writer"),
                     ("mediator", "+ rate limits reconciled (local decisions)"),
                     ("mediator-uvloop", "+ uvloop")]
            previous = None
            for name, label in steps:
                if name in closed:
                    value = closed[name]["cpu_us_per_request"]
                    change = f"{value - previous:+.0f}" if previous is not None else ""
                    print(f"  {label:45} {name:25} {value:7.0f} µs/req {change:>7}  "
                          f"{closed[name]['rps']:6.0f} req/s")
                    previous = value
        saturated = [n for n, r in fixed.items() if r["generator_cpu_pct_of_core"] > 50] + \
                    [n for n, r in fixed.items() if r["achieved_rate"] < 0.95 * r["rate"]]
        if saturated:
            print(f"WARNING: open loop not kept up for {sorted(set(saturated))} (generator > 50 % of a core or "
                  "achieved < 95 % of the rate)")
        header["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        print(f"# load average at the end: {' '.join(map(str, header['load_average_at_end']))}")
        if args.json:
            args.json.write_text(json.dumps({"run": header, "closed": closed, "fixed_rate": rates, "fixed": fixed,
                                             "targets": targets_met}, indent=2))
        if any(c["errors"] for c in closed.values()) or any(f["errors"] for f in fixed.values()):
            print("ERRORS during the run: figures are not valid", file=sys.stderr)
            return 1
        return 0
    finally:
        processes.stop_all()
        if not os.environ.get("BENCH_KEEP_TMP"):
            shutil.rmtree(tmp, ignore_errors=True)
        if any("rate limits" in f.name for f in features):
            delete_redis_keys(f"bench-{run_id}:")


def fetch(url: str, headers: dict[str, str] | None = None) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as resp:
        body: bytes = resp.read()
        return body


if __name__ == "__main__":
    sys.exit(main())
