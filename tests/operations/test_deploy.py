"""deploy/ checked offline with what runs here: YAML/JSON parse, required keys, probe paths answered by
the real app, Prometheus targets the ops port, every Grafana PromQL metric exists in a real scrape,
systemd-analyze verify. Docker has no engine here, so the Dockerfile is checked by reading it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mediator.config import load_config
from mediator.server import mediator_sites
from tests.conftest import channels_yaml, upstream_url, write_config

DEPLOY = Path(__file__).parents[2] / "deploy"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s(kind: str) -> list[dict]:
    return [d for path in K8S for d in _docs(path) if d["kind"] == kind]


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
    assert kinds == {"Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler"}


def test_deployment_is_non_root_with_ports_and_grace_matching_the_config(deploy_config):
    (deployment,) = _k8s("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    server = deploy_config.channels.server
    assert ports == {"fhir": server.listen.port, "ops": server.metrics.port}
    assert pod["terminationGracePeriodSeconds"] > server.shutdown.drain_timeout_s
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for service in _k8s("Service"):
        assert service["spec"]["selector"].items() <= labels.items()
    (hpa,) = _k8s("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["OPENIMIS_PASSWORD"]["valueFrom"]


async def test_probe_paths_are_answered_by_the_ops_listener(tmp_path, sandbox_server, aiohttp_client):
    (deployment,) = _k8s("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
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


def test_configmap_mirrors_deploy_config_which_is_valid(tmp_path, deploy_config):
    (configmap,) = _k8s("ConfigMap")
    assert configmap["data"]["channels.yaml"] == (DEPLOY / "config" / "channels.yaml").read_text()
    assert configmap["data"]["ip_allowlist.yaml"] == (DEPLOY / "config" / "policies" / "ip_allowlist.yaml").read_text()
    write_config(tmp_path, configmap["data"]["channels.yaml"], configmap["data"]["ip_allowlist.yaml"])
    assert load_config(tmp_path).channels == deploy_config.channels


def test_secrets_hold_placeholders_only():
    text = "\n".join(path.read_text() for path in sorted(DEPLOY.rglob("*")) if path.is_file()
                     and path.suffix in (".yaml", ".yml", ".json", ".service", "") and path.name != "ensure-redis.sh")
    assert "PRIVATE KEY" not in text and "admin123" not in text
    for secret in _k8s("Secret"):
        assert all(v.startswith("REPLACE") for v in secret["stringData"].values())


def test_compose_runs_mediator_redis_openimis_and_its_database():
    (compose,) = _docs(DEPLOY / "docker-compose.yml")
    services = compose["services"]
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
