"""deploy/ checked offline with what runs here: YAML/JSON parse, required keys, probe paths answered by
the real app, Prometheus targets the ops port, every Grafana PromQL metric exists in a real scrape,
systemd-analyze verify. Docker has no engine here, so the Dockerfile is checked by reading it.

Several replicas: every feature whose state the replicas must share is backed by the one Redis, the
manifests' wiring (Service name and port, NetworkPolicy, Secrets, env, ConfigMap items) matches the
configuration, the Redis command lines of the manifests are run by a real redis-server, and two
instances of deploy/config (its cluster-only hosts and paths moved here) share their state through it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml
from joserfc.jwk import ECKey
from prometheus_client.parser import text_string_to_metric_families

from mediator.certs import make_dev_pki
from mediator.config import POLICY_FILES, load_config
from mediator.config.clients import ClientsPolicy
from mediator.config.lint import named_environment_variables
from mediator.config.rate_limits import RateLimitsPolicy
from mediator.identity.client import client_assertion
from mediator.replica.policy import ReplicaPolicy
from mediator.server import mediator_sites
from tests.conftest import channels_yaml, upstream_url, write_config
from tests.identity.kit import form
from tests.load_helpers import free_port

DEPLOY = Path(__file__).parents[2] / "deploy"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
MEDIATOR = "openimis-mediator"
REDIS = "openimis-mediator-redis"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s(kind: str) -> list[dict]:
    return [d for path in K8S for d in _docs(path) if d["kind"] == kind]


def _named(kind: str, name: str) -> dict:
    (doc,) = [d for d in _k8s(kind) if d["metadata"]["name"] == name]
    return doc


def _pod_labels(deployment_name: str) -> dict[str, str]:
    return _named("Deployment", deployment_name)["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def _container(deployment_name: str) -> dict:
    (container,) = _named("Deployment", deployment_name)["spec"]["template"]["spec"]["containers"]
    return container


def _compose() -> dict:
    (compose,) = _docs(DEPLOY / "docker-compose.yml")
    return compose


def _redis_port(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    return parts.hostname, parts.port or 6379, parts.path


@pytest.fixture(scope="module")
def deploy_config():
    return load_config(DEPLOY / "config")


def test_every_yaml_file_under_deploy_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 9
    for path in files:
        assert _docs(path), path


def test_kubernetes_manifests_have_the_required_keys():
    kinds = set()
    for path in K8S:
        for doc in _docs(path):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            assert doc["metadata"].get("name"), path
            body = {"ConfigMap": "data", "Secret": "stringData"}.get(doc["kind"], "spec")
            assert isinstance(doc.get(body), dict), (path, doc["kind"])
            kinds.add(doc["kind"])
    assert kinds == {"Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler",
                     "PersistentVolumeClaim", "NetworkPolicy"}


def test_deployment_is_non_root_with_ports_and_grace_matching_the_config(deploy_config):
    deployment = _named("Deployment", MEDIATOR)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    server = deploy_config.channels.server
    assert ports == {"fhir": server.listen.port, "ops": server.metrics.port}
    assert pod["terminationGracePeriodSeconds"] > server.shutdown.drain_timeout_s
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for name in (MEDIATOR, f"{MEDIATOR}-ops"):
        selector = _named("Service", name)["spec"]["selector"]
        # the mediator's pods, never Redis's (the public Service would forward FHIR clients to Redis)
        assert _selects(selector, labels) and not _selects(selector, _pod_labels(REDIS)), name
    (hpa,) = _k8s("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["OPENIMIS_PASSWORD"]["valueFrom"]


async def test_probe_paths_are_answered_by_the_ops_listener(tmp_path, sandbox_server, aiohttp_client):
    container = _container(MEDIATOR)
    probes = [container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]]
    assert {p["path"] for p in probes} == {"/healthz", "/readyz"}
    assert {p["port"] for p in probes} == {"ops"}
    root = write_config(tmp_path, channels_yaml(upstream_url(sandbox_server),
                                                extra_server="metrics:\n  port: 0\n"))
    fhir_site, ops_site = mediator_sites(load_config(root))
    await aiohttp_client(fhir_site.app)  # started as in `serve`: its pools open
    ops = await aiohttp_client(ops_site.app)
    for probe in probes:
        assert (await ops.get(probe["path"])).status == 200


def _deploy_config_files() -> dict[str, str]:
    """Path relative to deploy/config → text, for every file the mediator reads there."""
    root = DEPLOY / "config"
    return {path.relative_to(root).as_posix(): path.read_text() for path in sorted(root.rglob("*")) if path.is_file()}


def test_configmap_mirrors_deploy_config_which_is_valid(tmp_path, deploy_config):
    (configmap,) = _k8s("ConfigMap")
    files = _deploy_config_files()
    assert {PurePosixPath(p).name: text for p, text in files.items()} == configmap["data"]
    # What the pod sees: the ConfigMap keys the Deployment's items map, at the paths they name.
    (volume,) = [v for v in _named("Deployment", MEDIATOR)["spec"]["template"]["spec"]["volumes"]
                 if v.get("configMap", {}).get("name") == configmap["metadata"]["name"]]
    mounted = {item["path"]: configmap["data"][item["key"]] for item in volume["configMap"]["items"]}
    assert mounted == files   # every file, each where the mediator looks for it (policies/<name>)
    for path, text in mounted.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    pod_config = load_config(tmp_path)
    assert pod_config.channels == deploy_config.channels and pod_config.policies == deploy_config.policies
    # Deny by default stays, but the example must say how policies are supplied: it ships them.
    assert {"ip_allowlist", "authorization", "clients", "write_profiles", "rate_limits"} <= pod_config.policies.keys()
    assert {f"policies/{POLICY_FILES[key].filename}" for key in pod_config.policies} <= mounted.keys()


def test_deploy_config_checks_clean_with_the_environment_the_deployment_sets(deploy_config):
    """`openimis-mediator check --strict --config deploy/config`: no error and no warning (an unset
    variable, an absent authorization or write policy, an unreachable channel would each be one)."""
    names = [e["name"] for e in _container(MEDIATOR)["env"]]
    environ = {**{k: v for k, v in os.environ.items() if k not in names}, **{n: "set-by-the-test" for n in names}}
    result = subprocess.run([sys.executable, "-m", "mediator", "check", "--strict", "--config", str(DEPLOY / "config")],
                            capture_output=True, text=True, env=environ, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr and "configuration is valid" in result.stdout
    # Without the variables the configuration names, the same check fails and names each of them.
    named = [variable for _, _, variable, _ in named_environment_variables(deploy_config)]
    assert {"OPENIMIS_PASSWORD", "REDIS_PASSWORD", "MEDIATOR_REDIS_URL"} <= set(named) <= set(names)
    unset = subprocess.run([sys.executable, "-m", "mediator", "check", "--strict", "--config", str(DEPLOY / "config")],
                           capture_output=True, text=True, timeout=60,
                           env={k: v for k, v in environ.items() if k not in named})
    assert unset.returncode == 2 and all(f"environment variable {v} is not set" in unset.stderr for v in named)


def test_every_replica_shared_feature_is_backed_by_redis(deploy_config):
    """The Deployment runs several replicas (HPA up to 10): whatever they must share is in Redis, else
    N replicas admit N times each limit and a replayed assertion or a repeated claim passes elsewhere."""
    assert _named("HorizontalPodAutoscaler", MEDIATOR)["spec"]["maxReplicas"] > 1
    server_redis = deploy_config.channels.server.redis
    assert server_redis is not None   # rate limits, idempotency, cluster budget, claim queue
    assert server_redis.password_env and urlsplit(server_redis.url).password is None
    for name, upstream in deploy_config.channels.upstreams.items():
        assert upstream.bulkhead.scope == "cluster", name   # one in-flight budget toward openIMIS
        assert upstream.bulkhead.mode == "adaptive", name
    clients = deploy_config.policy("clients", ClientsPolicy)
    replay = clients.token_service.replay_store
    assert replay.redis_url_env is not None   # client-assertion jti seen by one replica refused by all
    replica = deploy_config.policies.get("replica")
    assert replica is None or (isinstance(replica, ReplicaPolicy) and replica.store == "redis")
    # a repeated claim POST is answered once whichever replica gets it; queued claims drain from any replica
    claims = {c.name: c for c in deploy_config.channels.channels if c.name in ("claims", "claims-batch")}
    assert len(claims) == 2
    assert all(c.idempotency is not None and c.async_submission is not None for c in claims.values())
    assert deploy_config.policy("rate_limits", RateLimitsPolicy).limits


def test_redis_service_name_and_port_match_every_url_naming_it(deploy_config):
    assert deploy_config.channels.server.redis is not None
    host, port, database = _redis_port(deploy_config.channels.server.redis.url)
    service = _named("Service", host)
    assert _selects(service["spec"]["selector"], _pod_labels(REDIS))
    assert not _selects(service["spec"]["selector"], _pod_labels(MEDIATOR))
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    redis_container = _container(REDIS)
    container_ports = {p["name"]: p["containerPort"] for p in redis_container["ports"]}
    assert str(container_ports[service_port["targetPort"]]) == _argument(redis_container["args"], "--port") == str(port)
    replay_env = deploy_config.policy("clients", ClientsPolicy).token_service.replay_store.redis_url_env
    env = _container(MEDIATOR)["env"]
    names = [e["name"] for e in env]
    (replay_url,) = [e["value"] for e in env if e["name"] == replay_env]
    parts = urlsplit(replay_url)
    assert (parts.hostname, parts.port or 6379, parts.path) == (host, port, database)
    # Kubernetes expands $(VAR) only from variables defined before it, from the Secret Redis uses
    assert parts.password == "$(REDIS_PASSWORD)" and names.index("REDIS_PASSWORD") < names.index(replay_env)
    password_ref = next(e for e in env if e["name"] == "REDIS_PASSWORD")["valueFrom"]["secretKeyRef"]
    redis_env = {e["name"]: e for e in redis_container["env"]}
    assert redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == password_ref
    assert _argument(redis_container["args"], "--requirepass") == "$(REDIS_PASSWORD)"
    assert password_ref["key"] in _named("Secret", password_ref["name"])["stringData"]


def test_networkpolicy_lets_only_the_mediator_pods_reach_redis():
    (policy,) = _k8s("NetworkPolicy")
    spec = policy["spec"]
    assert _selects(spec["podSelector"]["matchLabels"], _pod_labels(REDIS))
    assert not _selects(spec["podSelector"]["matchLabels"], _pod_labels(MEDIATOR))
    assert "Ingress" in spec["policyTypes"]
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]
    assert peer.keys() == {"podSelector"}   # no namespaceSelector or ipBlock: this namespace's mediator pods only
    assert _selects(peer["podSelector"]["matchLabels"], _pod_labels(MEDIATOR))
    assert not _selects(peer["podSelector"]["matchLabels"], _pod_labels(REDIS))
    redis_port = {p["containerPort"] for p in _container(REDIS)["ports"]}
    assert [(p.get("protocol", "TCP"), p["port"]) for p in rule["ports"]] == [("TCP", port) for port in redis_port]


def test_redis_deployment_is_durable_single_and_non_root():
    deployment = _named("Deployment", REDIS)
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"   # never two on one AOF
    pod = spec["template"]["spec"]
    container = _container(REDIS)
    assert container["image"].startswith("redis:7")
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    assert "exec" in container["readinessProbe"] and container["resources"]["limits"]["memory"]
    assert container["resources"]["requests"]["memory"]
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == _argument(container["args"], "--dir")
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = _named("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]


def test_every_file_the_config_names_is_mounted_from_a_secret(deploy_config):
    """TLS material and the access-token signing key (one for every replica) come from Secrets at the
    paths the configuration names, in Kubernetes and in compose."""
    tls = deploy_config.channels.server.listen.tls
    assert tls is not None and tls.client_ca_file is not None
    signing = deploy_config.policy("clients", ClientsPolicy).token_service.signing_key_file
    paths = [PurePosixPath(p) for p in (tls.cert_file, tls.key_file, tls.client_ca_file, signing)]
    pod = _named("Deployment", MEDIATOR)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {PurePosixPath(m["mountPath"]): m for m in _container(MEDIATOR)["volumeMounts"]}
    compose_targets = {PurePosixPath(v.split(":")[1]) for v in _compose()["services"]["mediator"]["volumes"]}
    for path in paths:
        assert path.is_absolute(), path   # not under the (read-only, ConfigMap) config directory
        mount = mounts[path.parent]
        assert mount["readOnly"] is True
        secret = _named("Secret", volumes[mount["name"]]["secret"]["secretName"])
        assert path.name in secret["stringData"], path
        assert path in compose_targets, path


def test_compose_wires_the_mediator_to_its_durable_redis(deploy_config):
    services = _compose()["services"]
    mediator, store = services["mediator"], services["redis"]
    assert deploy_config.channels.server.redis is not None
    host, port, database = _redis_port(deploy_config.channels.server.redis.url)
    assert host in store["networks"]["default"]["aliases"] and _argument(store["command"], "--port") == str(port)
    replay_env = deploy_config.policy("clients", ClientsPolicy).token_service.replay_store.redis_url_env
    parts = urlsplit(mediator["environment"][replay_env])
    assert (parts.hostname, parts.port or 6379, parts.path) == (host, port, database)
    assert parts.password == "${REDIS_PASSWORD}"
    for _, _, variable, _ in named_environment_variables(deploy_config):
        assert variable in mediator["environment"], variable
    assert mediator["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD")
    assert _argument(store["command"], "--requirepass").startswith("${REDIS_PASSWORD")
    # the same Redis as Kubernetes runs (README: "with the arguments of k8s/redis.yaml")
    same = [re.sub(r"^\$\{REDIS_PASSWORD[^}]*\}$", "$(REDIS_PASSWORD)", a) for a in store["command"][1:]]
    assert same == _container(REDIS)["args"]
    assert mediator["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert any(v.endswith(":/data") for v in store["volumes"]) and store["user"].split(":")[0] != "0"
    # the one configuration directory: the image's CMD, the compose mount and the Deployment's args
    cmd = next(json.loads(line.split(None, 1)[1]) for line in (DEPLOY / "Dockerfile").read_text().splitlines()
               if line.startswith("CMD "))
    config_dir = _argument(cmd, "--config")
    assert f"./config:{config_dir}:ro" in mediator["volumes"] and "command" not in mediator
    assert _argument(_container(MEDIATOR)["args"], "--config") == config_dir


def _argument(args: list[str], option: str) -> str:
    (index,) = [i for i, a in enumerate(args) if a == option]
    return args[index + 1]


@pytest.fixture
def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (run `make redis`)")
    return binary


@contextlib.contextmanager
def _run_redis(binary: str, args: list[str], password: str) -> Iterator[int]:
    """redis-server with a manifest's arguments, its password, port and directory replaced (Redis changes
    to --dir at once, so the value is replaced rather than overridden), listening on loopback only."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="deploy-redis-")
    replaced = {"--port": str(port), "--dir": workdir, "--requirepass": password}
    argv = [binary, *(replaced.get(args[i - 1], a) if i else a for i, a in enumerate(args)),
            "--bind", "127.0.0.1", "--daemonize", "no"]
    assert argv.count(password) == 1 and argv.count(workdir) == 1
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, password=password, socket_connect_timeout=0.2)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None:
                    pytest.fail(f"redis-server refused the arguments {args}")
                time.sleep(0.05)
        else:
            pytest.fail("redis-server did not answer within 5 s")
        client.close()
        yield port
    finally:
        process.kill()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def _redis_argument_lists() -> dict[str, list[str]]:
    compose = _compose()["services"]["redis"]["command"]
    assert compose[0] == "redis-server"
    container = _container(REDIS)
    assert container["command"] == ["redis-server"]
    return {"kubernetes": container["args"], "compose": compose[1:]}


@pytest.mark.parametrize("manifest", ["kubernetes", "compose"])
def test_redis_of_the_manifests_keeps_every_acknowledged_write_and_requires_the_password(manifest, redis_binary):
    """README "Queued claims": appendonly with appendfsync always, no eviction; and AUTH required."""
    password = secrets.token_hex(16)
    with _run_redis(redis_binary, _redis_argument_lists()[manifest], password) as port:
        client = redis.Redis(port=port, password=password, decode_responses=True)
        settings: dict[str, Any] = {}
        for name in ("appendonly", "appendfsync", "maxmemory-policy", "save", "maxmemory"):
            settings.update(client.config_get(name))
        assert settings["appendonly"] == "yes" and settings["appendfsync"] == "always"
        assert settings["maxmemory-policy"] == "noeviction" and settings["save"] == ""
        assert int(settings["maxmemory"]) > 0
        client.close()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_connect_timeout=0.5).set("k", "v")
        # the readiness probe (k8s) / healthcheck (compose), pointed at this port
        probe = _redis_probe(manifest).replace("redis-cli", f"redis-cli -p {port}")
        ok = subprocess.run(["sh", "-c", probe], env={**os.environ, "REDISCLI_AUTH": password}, timeout=10)
        refused = subprocess.run(["sh", "-c", probe], env={**os.environ, "REDISCLI_AUTH": "wrong"}, timeout=10,
                                 capture_output=True)
        assert ok.returncode == 0 and refused.returncode != 0


def _redis_probe(manifest: str) -> str:
    if manifest == "kubernetes":
        command = _container(REDIS)["readinessProbe"]["exec"]["command"]
    else:
        command = _compose()["services"]["redis"]["healthcheck"]["test"]
        assert command[0] == "CMD-SHELL"
        command = ["sh", "-c", command[1]]
    assert command[:2] == ["sh", "-c"]
    return str(command[2])


def _local_copy_of_deploy_config(root: Path, upstream: str, redis_port: int, certs: Path) -> Path:
    """deploy/config with what only a cluster has moved to this machine: the sandbox as openIMIS, a
    local redis-server, files under tmp, loopback in the hospital networks, vendor-a's keys from its dev
    certificate. Each replaced text must be there, so the copy cannot silently drift from deploy/config."""
    replacements = {
        "channels.yaml": {"/etc/openimis-mediator/tls/tls.crt": str(certs / "server.crt"),
                          "/etc/openimis-mediator/tls/tls.key": str(certs / "server.key"),
                          "/etc/openimis-mediator/tls/ca.crt": str(certs / "ca.crt"),
                          "/var/log/openimis-mediator/audit.log": str(root / "audit.log"),
                          "http://backend:8000/api/api_fhir_r4/": upstream,
                          "redis://openimis-mediator-redis:6379/0": f"redis://127.0.0.1:{redis_port}/0"},
        "policies/clients.yaml": {"/etc/openimis-mediator/signing/": str(root / "signing") + "/",
                                  "jwks_url: https://hms.vendor-a.example/.well-known/jwks.json":
                                      f"public_key_file: {certs / 'vendor-a.crt'}"},
        "policies/ip_allowlist.yaml": {'allow: ["10.0.0.0/8",': 'allow: ["127.0.0.0/8", "10.0.0.0/8",'},
    }
    for path, text in _deploy_config_files().items():
        for old, new in replacements.get(path, {}).items():
            assert text.count(old) == 1, (path, old)
            text = text.replace(old, new)
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def _remaining(header: str, limit: str) -> int:
    found = re.search(rf'"{limit}";r=(\d+)', header)
    assert found is not None, header
    return int(found.group(1))


async def test_two_replicas_of_the_deploy_config_share_state_through_the_manifests_redis(
        tmp_path, sandbox_server, aiohttp_client, monkeypatch, redis_binary):
    """Two instances of deploy/config on one redis-server run with k8s/redis.yaml's arguments, with the
    variables built as the Deployment builds them: both are ready (Redis and the replay store answer,
    so the password reaches both), an assertion used at one is refused at the other, and requests at
    one are counted in the rate limit the other answers with."""
    password = secrets.token_hex(16)
    certs = tmp_path / "certs"
    make_dev_pki(certs)
    with _run_redis(redis_binary, _container(REDIS)["args"], password) as port:
        root = _local_copy_of_deploy_config(tmp_path / "config", upstream_url(sandbox_server), port, certs)
        template = next(e["value"] for e in _container(MEDIATOR)["env"] if e["name"] == "MEDIATOR_REDIS_URL")
        monkeypatch.setenv("REDIS_PASSWORD", password)
        monkeypatch.setenv("MEDIATOR_REDIS_URL", template.replace("$(REDIS_PASSWORD)", password)
                           .replace("@openimis-mediator-redis:6379/", f"@127.0.0.1:{port}/"))
        config = load_config(root)
        replicas = []
        for _ in range(2):
            fhir_site, ops_site = mediator_sites(config)
            replicas.append((await aiohttp_client(fhir_site.app), await aiohttp_client(ops_site.app)))
        for _, ops in replicas:
            ready = await ops.get("/readyz")
            body = await ready.json()
            assert ready.status == 200 and body["redis"] == "up" and body["replay_store"] == "up", body
        (first, _), (second, _) = replicas
        vendor_a = ECKey.import_key((certs / "vendor-a.key").read_bytes())
        assertion = client_assertion("vendor-a", vendor_a, "https://mediator.example.org/auth/token")
        assert (await first.post("/auth/token", data=form(assertion))).status == 200
        assert (await second.post("/auth/token", data=form(assertion))).status == 401   # replayed elsewhere
        # per-user (2/s, burst 120; without a principal keyed by the client IP): 20 at one replica are
        # counted at the other, which alone would answer r=119 (slack: 5 s of refill on a slow machine)
        for _ in range(20):
            assert (await first.get("/fhir/metadata")).status == 200
        answer = await second.get("/fhir/metadata")
        assert answer.status == 200
        assert _remaining(answer.headers["RateLimit"], "per-user") <= 119 - 10
        store = redis.Redis(port=port, password=password)
        assert store.keys("openimis-mediator:rl:*") and store.keys("openimis-mediator:jti:*")
        store.close()


def test_secrets_hold_placeholders_only():
    text = "\n".join(path.read_text() for path in sorted(DEPLOY.rglob("*")) if path.is_file()
                     and path.suffix in (".yaml", ".yml", ".json", ".service", "") and path.name != "ensure-redis.sh")
    assert "PRIVATE KEY" not in text and "admin123" not in text
    for secret in _k8s("Secret"):
        assert all(v.startswith("REPLACE") for v in secret["stringData"].values())


def test_compose_runs_mediator_redis_openimis_and_its_database():
    services = _compose()["services"]
    assert {"mediator", "redis", "backend", "db"} <= services.keys()
    assert "openimis-be" in services["backend"]["image"] and "openimis-pgsql" in services["db"]["image"]
    mediator = services["mediator"]
    assert mediator["build"]["dockerfile"] == "deploy/Dockerfile"
    assert mediator["environment"]["OPENIMIS_PASSWORD"].startswith("${")
    assert all(v.endswith(":ro") for v in mediator["volumes"] if "certs/" in v)
    assert "127.0.0.1:9464:9464" in mediator["ports"]  # the ops port stays on the host's loopback


def test_prometheus_scrapes_the_ops_port_never_the_fhir_port(deploy_config):
    (config,) = _docs(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = config["scrape_configs"]
    assert all(job["metrics_path"] == "/metrics" for job in jobs)
    targets = [t for job in jobs for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert targets and all(t.endswith(f":{deploy_config.channels.server.metrics.port}") for t in targets)
    keep = [r for job in jobs for r in job.get("relabel_configs", []) if r.get("action") == "keep"]
    assert {"regex": "ops", "action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"]} in keep


async def test_every_grafana_query_uses_metrics_the_app_exposes(tmp_path, sandbox_server, aiohttp_client):
    root = write_config(tmp_path, channels_yaml(upstream_url(sandbox_server), extra_server="metrics:\n  port: 0\n"))
    fhir_site, ops_site = mediator_sites(load_config(root))
    fhir, ops = await aiohttp_client(fhir_site.app), await aiohttp_client(ops_site.app)
    await fhir.get("/fhir/Medication/")
    await fhir.get("/fhir/Nothing/")
    exposed = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "info": ("_info",), "gauge": ("",)}
    for family in text_string_to_metric_families(await (await ops.get("/metrics")).text()):
        exposed |= {family.name + s for s in suffixes.get(family.type, ("",))}
        exposed |= {s.name for s in family.samples}
    dashboard = json.loads((DEPLOY / "grafana" / "openimis-mediator.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        names = re.findall(r"\b((?:mediator|process)_[a-z0-9_]+)\b", expr)
        assert names, expr
        assert set(names) <= exposed, (expr, set(names) - exposed)


def test_dockerfile_runs_as_non_root_without_keys_and_with_a_healthcheck(deploy_config):
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    keywords = [k for k, *_ in instructions]
    assert instructions[0] == ["FROM", "python:3.11-slim"]
    users = [rest[0].split(":")[0] for k, *rest in instructions if k == "USER"]
    assert users and users[-1] not in ("0", "root")
    assert "ADD" not in keywords
    copies = " ".join(rest[0] for k, *rest in instructions if k == "COPY")
    assert "certs" not in copies and ".key" not in copies and ".pem" not in copies
    assert "HEALTHCHECK" in keywords
    assert f"127.0.0.1:{deploy_config.channels.server.metrics.port}/healthz" in text
    assert keywords.index("USER") > keywords.index("RUN")  # nothing runs as root after USER is set


def test_systemd_unit_verifies_and_is_hardened(tmp_path):
    unit = (DEPLOY / "systemd" / "openimis-mediator.service").read_text()
    for directive in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                      "CapabilityBoundingSet=\n", "ExecReload=/bin/kill -HUP $MAINPID", "KillSignal=SIGTERM"):
        assert directive in unit
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    # verify checks that ExecStart exists: point it at this checkout's entry point; the env file is optional.
    executable = Path(shutil.which("openimis-mediator") or Path(__file__).parents[2] / ".venv/bin/openimis-mediator")
    if not executable.exists():
        pytest.skip("openimis-mediator entry point not installed")
    local = unit.replace("/opt/openimis-mediator/bin/openimis-mediator", str(executable)).replace(
        "EnvironmentFile=/etc/", "EnvironmentFile=-/etc/")
    path = tmp_path / "openimis-mediator.service"
    path.write_text(local)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines() if str(path) in line]
    assert result.returncode == 0 and problems == [], result.stderr


@pytest.mark.parametrize("policy", ["authorization.yaml", "write_profiles.yaml", "rate_limits.yaml"])
def test_the_deploy_policies_are_the_shipped_ones(policy):
    """deploy/config/policies carries copies of the shipped policies (a ConfigMap cannot reach outside
    deploy/); a change to one without the other would deploy something the policy tests never saw."""
    shipped = Path(__file__).parents[2] / "policies" / policy
    assert (DEPLOY / "config" / "policies" / policy).read_text() == shipped.read_text()
