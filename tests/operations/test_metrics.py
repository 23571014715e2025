"""The metrics listener: its own socket, bounded labels, build info, reload counters, upstream pools."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from mediator.config import load_config
from mediator.server import mediator_sites
from tests.conftest import channels_yaml, upstream_url, write_config

METRICS_ON = """\
metrics:
  host: 127.0.0.1
  port: 0
"""

# Values that only a request could have put into a label: ids, paths, query values, request ids.
REQUEST_TOKENS = ("zq81x", "987654321", "/fhir", "passwd", "caller-req-0001", "Claim/", "abc-123")


async def _serve_both(tmp_path, sandbox_server, aiohttp_client):
    root = write_config(tmp_path / "config", channels_yaml(upstream_url(sandbox_server), extra_server=METRICS_ON))
    fhir_site, metrics_site = mediator_sites(load_config(root))
    return await aiohttp_client(fhir_site.app), await aiohttp_client(metrics_site.app)


async def _scrape(client) -> dict[str, list]:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    families = {}
    for family in text_string_to_metric_families(await response.text()):
        families[family.name] = family.samples
    return families


async def test_metrics_are_on_their_own_listener_never_on_the_fhir_port(tmp_path, sandbox_server, aiohttp_client):
    fhir, metrics = await _serve_both(tmp_path, sandbox_server, aiohttp_client)
    public = await fhir.get("/metrics")
    assert public.status == 404
    assert (await public.json())["issue"][0]["details"]["coding"][0]["code"] == "channel.none"
    assert "mediator_requests" in await _scrape(metrics)
    assert (await metrics.get("/fhir/Medication/")).status == 404
    assert (await metrics.get("/healthz")).status == 200
    ready = await metrics.get("/readyz")
    assert ready.status == 200 and (await ready.json())["upstreams"] == {"openimis": True}


def test_without_a_metrics_key_there_is_no_metrics_listener(tmp_path):
    root = write_config(tmp_path, channels_yaml("http://127.0.0.1:1/api/api_fhir_r4/"))
    assert [s.name for s in mediator_sites(load_config(root))] == ["fhir"]


async def test_no_label_value_carries_an_id_a_path_or_a_query(tmp_path, sandbox_server, aiohttp_client):
    fhir, metrics = await _serve_both(tmp_path, sandbox_server, aiohttp_client)
    varied = [
        ("GET", "/fhir/Patient/abc-123-zq81x"), ("GET", "/fhir/Patient?identifier=987654321"),
        ("GET", "/fhir/Claim/zq81x"), ("GET", "/fhir/Medication/"), ("GET", "/fhir/NotAType/zq81x"),
        ("GET", "/fhir/%2e%2e/etc/passwd"), ("DELETE", "/fhir/Claim/zq81x"), ("GET", "/zq81x/other"),
        ("POST", "/fhir/Claim"),
    ]
    statuses = set()
    for method, path in varied:
        headers = {"X-Request-ID": "caller-req-0001", "Content-Type": "application/json"}
        response = await fhir.request(method, path, headers=headers,
                                      data=b"{not json" if method == "POST" else None)
        statuses.add(response.status)
    assert {200, 400, 404, 405} <= statuses  # the requests really went through different paths
    families = await _scrape(metrics)
    requests = families["mediator_requests"]
    assert sum(s.value for s in requests) == len(varied)
    labelled = [(s.name, value) for samples in families.values() for s in samples for value in s.labels.values()]
    assert labelled
    offenders = [(name, value) for name, value in labelled if any(t in value for t in REQUEST_TOKENS)]
    assert offenders == []
    assert {s.labels["channel"] for s in requests} <= {"none", "master-data", "eligibility", "claims"}


async def test_build_info_worker_and_upstream_pool_state_are_exposed(tmp_path, sandbox_server, aiohttp_client):
    fhir, metrics = await _serve_both(tmp_path, sandbox_server, aiohttp_client)
    assert (await fhir.get("/fhir/Medication/")).status == 200
    families = await _scrape(metrics)
    (build,) = families["mediator_build_info"]
    assert build.labels["version"] == "0.1.0" and build.labels["aiohttp"].startswith("3.")
    assert [(s.labels, s.value > 0) for s in families["mediator_worker_pid"]] == [({"worker": "0"}, True)]
    assert [(s.labels, s.value) for s in families["mediator_upstream_pool_limit"]] == [({"upstream": "openimis"}, 32)]
    assert [(s.labels, s.value) for s in families["mediator_upstream_in_flight"]] == [({"upstream": "openimis"}, 0)]
    assert families["mediator_config_last_reload_success_timestamp_seconds"][0].value > 1.6e9
    assert "process_resident_memory_bytes" in families


def test_label_children_are_the_metrics_own_children_remembered_per_label_tuple():
    from mediator.metrics import Metrics

    metrics = Metrics()
    child = metrics.request_children.labels("master-data", "200", "upstream.answered")
    assert child is metrics.requests.labels("master-data", "200", "upstream.answered")
    assert metrics.request_children.labels("master-data", "200", "upstream.answered") is child
    child.inc()
    metrics.request_children.labels("master-data", "404", "channel.none").inc(2)
    value = metrics.registry.get_sample_value
    assert value("mediator_requests_total", {"channel": "master-data", "status": "200",
                                             "reason": "upstream.answered"}) == 1
    assert value("mediator_requests_total", {"channel": "master-data", "status": "404", "reason": "channel.none"}) == 2
