"""Kit for the queued-submission tests against the REAL openIMIS: channels with async_submission, the
two vendors of tests/e2e/vendors.py, and the database check that every accepted claim exists once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.e2e.conftest import harness
from tests.e2e.vendors import AUTHORIZATION, CLIENTS, VENDORS

ASYNC = "{reclaim_idle_s: 3, retry_initial_s: 0.2, retry_max_s: 1, poll_interval_s: 0.1}"

CHANNELS = f"""\
- name: claims
  path: ^/fhir/Claim(/[^/]+)?/?$
  methods: [GET, POST]
  upstream: openimis
  timeout_s: 30
  ip_allowlist: [local]
  idempotency: {{window_s: 600}}
  async_submission: {ASYNC}
- name: claim-batch
  path: ^/fhir/?$
  methods: [POST]
  upstream: openimis
  timeout_s: 30
  ip_allowlist: [local]
  idempotency: {{window_s: 600}}
  batch: {{max_entries: 10}}
  async_submission: {ASYNC}
- name: claim-status
  path: ^/fhir/ClaimResponse(/[^/]+)?/?$
  methods: [GET]
  upstream: openimis
  timeout_s: 30
  ip_allowlist: [local]
"""

POLICIES = {"clients.yaml": CLIENTS, "authorization.yaml": AUTHORIZATION}
PREFER_ASYNC = {"Prefer": "respond-async"}
__all__ = ["CHANNELS", "POLICIES", "PREFER_ASYNC", "VENDORS", "claims_in_openimis", "wait_settled"]


def claims_in_openimis(info: dict[str, Any], codes: list[str]) -> dict[str, int]:
    """Current (not historical) rows of tblClaim per claim code, read in openIMIS's own database.
    openIMIS keeps a history row (ValidityTo set) when it updates a claim; the claim itself is the one
    with ValidityTo NULL."""
    if not codes:
        return {}
    listed = ",".join("'" + c.replace("'", "''") + "'" for c in codes)
    out = harness._psql(harness.Config(), 'select "ClaimCode", count(*) from "tblClaim" where "ValidityTo" is null '
                        f'and "ClaimCode" in ({listed}) group by "ClaimCode"', db=info["db_name"])
    found = dict.fromkeys(codes, 0)
    for line in out.splitlines():
        code, count = line.split("|")
        found[code] = int(count)
    return found


async def wait_settled(get: Any, url: str, timeout: float = 60.0) -> Any:
    """Poll a status URL (honouring nothing but a short pause) until it no longer answers 202."""
    deadline = time.monotonic() + timeout
    while True:
        response = await get(url)
        if response.status != 202:
            return response
        assert response.headers.get("Retry-After", "").isdigit()
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} still 202 after {timeout}s")
        await asyncio.sleep(0.2)
