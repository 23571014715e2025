"""Facility-scoped searches and reads by claim code against the REAL openIMIS, with every request the
mediator sends to openIMIS counted by an HTTP relay between them.

The expected answers come from openIMIS's database (psql), not from any API the mediator uses: the claims
of a facility are `tblClaim` rows with `ValidityTo IS NULL` whose `HFID` is that facility.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from joserfc.jwk import ECKey

from tests.conftest import DEFAULT_IP_POLICY
from tests.e2e.conftest import e2e_channels, harness
from tests.e2e.vendors import AUTHORIZATION, CHANNELS, CLIENTS, VENDORS, Vendor, _reason, per_user_budget

# A limit that paging never exhausts (the database grows with every suite run): the test checks what
# each page is charged, not where the limit ends.
RATE_LIMITS = """\
version: 1
limits:
  - name: status-polls-per-user
    per: [user]
    rate: 1
    period_s: 86400
    burst: 100000
    channels: [claim-status, claims]
    on_store_error: deny
"""


class CountingRelay:
    """A plain HTTP relay in front of openIMIS that records every request passing through it."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.seen: list[tuple[str, str]] = []
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.Response:
        assert self.session is not None
        self.seen.append((request.method, request.path_qs))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self.session.request(request.method, self.target + request.path_qs, headers=headers,
                                        data=await request.read(), allow_redirects=False) as answer:
            body = await answer.read()
            kept = {k: v for k, v in answer.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection")}
            return web.Response(status=answer.status, body=body, headers=kept)


def _db_claims(facility: str, patient: str | None = None) -> dict[str, str]:
    """uuid -> code of the facility's live claims, read from openIMIS's database."""
    cfg = harness.Config()
    sql = ('select c."ClaimUUID", c."ClaimCode" from "tblClaim" c join "tblHF" h on h."HfID" = c."HFID" '
           'join "tblInsuree" i on i."InsureeID" = c."InsureeID" '
           f"where c.\"ValidityTo\" is null and h.\"HFCode\" = '{facility}'")
    if patient is not None:
        sql += f" and lower(i.\"InsureeUUID\") = lower('{patient}')"
    out = harness._psql(cfg, sql, db=cfg.db_name)
    return {line.split("|")[0].lower(): line.split("|")[1] for line in out.splitlines() if line}


@pytest.fixture
async def relayed(request, openimis, tmp_path: Path, make_mediator, aiohttp_server):
    """(relay, vendors); `rate_limits.yaml` is RATE_LIMITS unless the test gives its own (indirect param)."""
    rate_limits = getattr(request, "param", RATE_LIMITS)
    relay = CountingRelay(openimis["base_url"])
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", relay.handle)
    async with aiohttp.ClientSession() as session:
        relay.session = session
        server = await aiohttp_server(app)
        keys = {name: ECKey.generate_key("P-256") for name in VENDORS}
        root = tmp_path / "config"
        (root / "keys").mkdir(parents=True)
        for name, key in keys.items():
            (root / "keys" / f"{name}.pem").write_bytes(key.as_pem(private=False))
        prefix = f"e2e-{uuid.uuid4().hex[:8]}:"
        redis = f"redis:\n  url: redis://127.0.0.1:6379/0\n  key_prefix: \"{prefix}\"\n"
        relay_fhir = f"http://{server.host}:{server.port}/api/api_fhir_r4"
        client = await make_mediator(
            e2e_channels(relay_fhir, channels=CHANNELS, extra_server=redis), DEFAULT_IP_POLICY,
            {"clients.yaml": CLIENTS, "authorization.yaml": AUTHORIZATION, "rate_limits.yaml": rate_limits})
        vendors = {name: Vendor(client, name, keys[name]) for name in VENDORS}
        for vendor in vendors.values():
            await vendor.login()
        # Warm up: the mediator's openIMIS login and the facility directory are not per-request costs.
        assert (await vendors["vendor-jm"].request("GET", "/fhir/ClaimResponse?_count=0")).status == 200
        yield relay, vendors
        import redis.asyncio as aioredis

        store = aioredis.from_url("redis://127.0.0.1:6379/0")
        left = [k async for k in store.scan_iter(f"{prefix}*")]
        if left:
            await store.delete(*left)
        await store.aclose()


async def _walk(relay: CountingRelay, vendor: Vendor, first: str,
                own: int) -> tuple[list[dict], list[int], list[int]]:
    """Follow `next` links from `first`: (bundles, openIMIS requests per page, rate-limit remaining).
    `own`: how many claims the caller has; paging that takes more pages than that (plus one empty
    page for none) does not end. The bound follows the database, which grows with every suite run."""
    bundles, costs, remaining = [], [], []
    url: str | None = first
    while url is not None:
        before = len(relay.seen)
        response = await vendor.request("GET", url)
        assert response.status == 200, await response.text()
        costs.append(len(relay.seen) - before)
        remaining.append(int(response.headers["RateLimit"].split(";r=")[1].split(";")[0]))
        bundle = await response.json()
        bundles.append(bundle)
        nxt = [link["url"] for link in bundle.get("link", []) if link["relation"] == "next"]
        url = None
        if nxt:
            parts = urlsplit(nxt[0])
            url = f"{parts.path}?{parts.query}"
        assert len(bundles) <= max(own, 1), "paging does not end"
    return bundles, costs, remaining


def _ids(bundles: list[dict]) -> list[str]:
    return [e["resource"]["id"].lower() for b in bundles for e in b.get("entry", [])]


async def test_claim_response_search_pages_through_exactly_the_callers_claims(relayed):
    relay, vendors = relayed
    for name, facility in VENDORS.items():
        own = _db_claims(facility)
        bundles, costs, remaining = await _walk(relay, vendors[name], "/fhir/ClaimResponse?_count=2", len(own))
        seen = _ids(bundles)
        assert sorted(seen) == sorted(own), (facility, seen, own)    # every own claim once, nothing else
        assert all(b["total"] == len(own) for b in bundles)          # the caller's own count, every page
        assert all(1 <= len(b.get("entry", [])) <= 2 for b in bundles) or not own   # no empty foreign pages
        assert max(costs) <= 2, costs                                 # openIMIS requests per page served
        charged = [a - b for a, b in zip(remaining, remaining[1:], strict=False)]
        assert charged == [2] * (len(remaining) - 1)                  # the rate limit charged 2 per page


async def test_claim_search_by_patient_shows_only_the_callers_claims(relayed):
    relay, vendors = relayed
    patient = harness.INSUREE_070707070_UUID
    for name, facility in VENDORS.items():
        own = _db_claims(facility, patient)
        bundles, costs, _ = await _walk(relay, vendors[name], f"/fhir/Claim?patient={patient}&_count=1", len(own))
        assert sorted(_ids(bundles)) == sorted(own), facility
        assert all(b["total"] == len(own) for b in bundles)
        assert max(costs) <= 2, costs   # a one-claim page: the index + that claim's read
        # Pages of several claims read a window; when openIMIS's hour-long list-count cache hides claims
        # created since (Claim?refDate= is day-granular), the page's first claim is read directly: 3.
        bundles, costs, _ = await _walk(relay, vendors[name], f"/fhir/Claim?patient={patient}&_count=3", len(own))
        assert sorted(_ids(bundles)) == sorted(own), facility
        assert all(b["total"] == len(own) and b.get("entry") for b in bundles) or not own
        assert max(costs) <= 3, costs
        hf_uuid = harness.HEALTH_FACILITIES[facility][0]
        assert all(hf_uuid in str(e["resource"]["provider"]) for b in bundles for e in b.get("entry", []))
    # Jambero has claims for this insuree, so Rapta's walk (its own claims only, its own total) left them out.
    # Rapta may have some too: tests/e2e/test_write_firewall.py stores Rapta claims for this insuree, so on a
    # database that outlived one run "Rapta has none" is not a premise this test can rely on.
    assert set(_db_claims("JMHOS001", patient)).isdisjoint(_db_claims("RAHOS001", patient))
    assert _db_claims("JMHOS001", patient)


async def test_reads_by_claim_code_work_and_stay_within_the_facility(relayed):
    relay, vendors = relayed
    jm, ra = vendors["vendor-jm"], vendors["vendor-ra"]
    claim_uuid, code = next(iter(_db_claims("JMHOS001").items()))
    before = len(relay.seen)
    response = await jm.request("GET", f"/fhir/ClaimResponse/{code}")
    assert response.status == 200, await response.text()
    assert len(relay.seen) - before <= 2
    answer = await jm.request("GET", f"/fhir/Claim/{code}")   # openIMIS's own Claim/<code> read crashes
    assert answer.status == 200, await answer.text()
    assert (await answer.json())["id"].lower() == claim_uuid
    for path in (f"/fhir/ClaimResponse/{code}", f"/fhir/Claim/{code}"):
        refused = await ra.request("GET", path)
        assert (refused.status, _reason(await refused.json())) == (403, "authorization.owner_other_facility")
    # openIMIS's own Claim?identifier=<code> crashes too; the mediator answers it from the index.
    found = await jm.request("GET", f"/fhir/Claim?identifier={code}")
    assert found.status == 200, await found.text()
    assert [e["resource"]["id"].lower() for e in (await found.json())["entry"]] == [claim_uuid]
    hidden = await (await ra.request("GET", f"/fhir/Claim?identifier={code}")).json()
    assert hidden["total"] == 0 and "entry" not in hidden   # not 403: nothing confirms Jambero's code
    missing = await jm.request("GET", "/fhir/ClaimResponse/NOSUCHCODE1")
    assert (missing.status, _reason(await missing.json())) == (404, "authorization.owner_not_found")


# Room for the warm-up (a count-only search, cost 2) and three lookup reads (cost 2 each); no refill to speak of.
LOOKUP_BUDGET = per_user_budget(8)


@pytest.mark.parametrize("relayed", [LOOKUP_BUDGET], indirect=True)
async def test_reads_of_unknown_claims_are_charged_before_their_lookup(relayed):
    """Authorization asks openIMIS's claim index who owns a claim before it can refuse a read; a read of an
    unknown claim is 404 at authorization. Those reads are charged before the lookup: three pass (one lookup
    each, 404), then the user is over the limit and nothing more reaches openIMIS, however many it sends."""
    relay, vendors = relayed
    jm = vendors["vendor-jm"]
    before = len(relay.seen)
    statuses = []
    for _ in range(3):
        missing = await jm.request("GET", f"/fhir/ClaimResponse/{uuid.uuid4()}")
        statuses.append((missing.status, _reason(await missing.json())))
    assert statuses == [(404, "authorization.owner_not_found")] * 3
    looked_up = len(relay.seen) - before
    assert 1 <= looked_up <= 3 and all("graphql" in path for _, path in relay.seen[before:])
    for _ in range(20):
        refused = await jm.request("GET", f"/fhir/Claim/{uuid.uuid4()}")
        assert (refused.status, _reason(await refused.json())) == (429, "rate_limit.exceeded")
        assert "Retry-After" in refused.headers
    assert len(relay.seen) - before == looked_up   # over the limit: no lookup, no read
    # Another facility's user is not affected: its own budget, its own lookups.
    ra = vendors["vendor-ra"]
    other = await ra.request("GET", f"/fhir/ClaimResponse/{uuid.uuid4()}")
    assert (other.status, _reason(await other.json())) == (404, "authorization.owner_not_found")
