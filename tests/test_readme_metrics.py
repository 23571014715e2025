"""README "Metrics reference" against a real scrape of the ops listener: every metric of the table is
exposed with the type and labels the table gives, and every mediator_* metric exposed is in the table."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from mediator.app import METRICS
from mediator.async_claims.metrics import async_metrics
from mediator.config import load_config
from mediator.server import mediator_sites
from tests.conftest import channels_yaml, upstream_url, write_config

README = Path(__file__).resolve().parents[1] / "README.md"

# The exposition name of each type (prometheus-client appends _total to counters; an Info is a gauge
# named <name>_info in the text format, which is what the README table shows as "gauge (info)").
SUFFIX = {"counter": "_total", "gauge": "", "histogram": ""}


def readme_metrics() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, label names) from the table of "## Metrics reference"."""
    section = README.read_text().split("\n## Metrics reference\n", 1)[1].split("\n## ", 1)[0]
    table: dict[str, tuple[str, set[str]]] = {}
    for row in re.findall(r"(?m)^\| `([a-z_*]+)` \|(.*)$", section):
        name, rest = row
        if name == "process_*":
            continue
        kind, labels = (cell.strip() for cell in rest.split("|")[:2])
        while re.search(r"\([^()]*\)", labels):          # "(or `none`)", "(deny, local; `reconcile`: ...)"
            labels = re.sub(r"\([^()]*\)", "", labels)
        table[name] = (kind.split(" (")[0], set(re.findall(r"`([a-z_]+)`", labels)))
    return table


async def _scrape_everything(tmp_path, sandbox_server, aiohttp_client):
    """The shipped-like app with an ops listener; the queued-claim metrics registered as an
    `async_submission` channel registers them (they exist only with such a channel)."""
    root = write_config(tmp_path, channels_yaml(upstream_url(sandbox_server), extra_server="metrics:\n  port: 0\n"))
    fhir_site, ops_site = mediator_sites(load_config(root))
    fhir, ops = await aiohttp_client(fhir_site.app), await aiohttp_client(ops_site.app)
    await fhir.get("/fhir/Medication/")
    metrics = fhir_site.app[METRICS]
    async_metrics(metrics)
    text = await (await ops.get("/metrics")).text()
    return text, metrics


def _label_names(metrics, family) -> set[str]:
    labels = {k for s in family.samples for k in s.labels if k not in ("le",)}
    collector = metrics.registry._names_to_collectors.get(family.name)   # labelled, without samples yet
    return labels | set(getattr(collector, "_labelnames", ()))


async def test_every_metric_of_the_readme_table_is_exposed_with_its_type_and_labels(
        tmp_path, sandbox_server, aiohttp_client):
    text, metrics = await _scrape_everything(tmp_path, sandbox_server, aiohttp_client)
    exposed = {}
    for family in text_string_to_metric_families(text):
        exposed[family.name + SUFFIX.get(family.type, "")] = (family.type, _label_names(metrics, family))
    table = readme_metrics()
    assert len(table) >= 40
    wrong = {name: (documented, exposed.get(name)) for name, documented in table.items()
             if exposed.get(name) != documented}
    assert wrong == {}
    created = {n for n in exposed if n.endswith("_created") and exposed[n][0] == "gauge"
               and {n.removesuffix("_created"), n.removesuffix("_created") + "_total"} & set(table)}
    assert "mediator_requests_created" in created   # prometheus-client's, documented below the table
    undocumented = sorted(n for n in exposed if n.startswith("mediator_") and n not in table and n not in created)
    assert undocumented == []


async def test_counters_also_expose_created_gauges_as_the_readme_says(tmp_path, sandbox_server, aiohttp_client):
    text, _ = await _scrape_everything(tmp_path, sandbox_server, aiohttp_client)
    assert "# TYPE mediator_requests_created gauge" in text
    assert "`*_created`" in README.read_text().split("\n## Metrics reference\n", 1)[1].split("\n## ", 1)[0]
