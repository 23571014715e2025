#!/usr/bin/env python3
"""Probe the real openIMIS backend directly (no mediator) and print the facts recorded in README.md.

    python tests/openimis/probe.py [--reps 5] [--json out.json]

Starts the backend with harness.up() if needed. Standard library only. Each check runs --reps
times; the table shows the last status, a one-line summary of the body and the median latency.
Creates a few claims (unique codes), so the database drifts: `harness.py up --fresh-db` resets it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

HF = harness.HEALTH_FACILITIES
UUID_TO_HF = {v[0]: k for k, v in HF.items()}


def call(method, url, body=None, token=None, ctype="application/json", accept="application/json"):
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    req = urllib.request.Request(url, data=data, method=method)
    if accept:
        req.add_header("Accept", accept)
    if data is not None and ctype:
        req.add_header("Content-Type", ctype)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    t0 = time.perf_counter()

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(req, timeout=120) as r:
            status, raw, headers = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        with e:
            status, raw, headers = e.code, e.read(), e.headers
    ms = (time.perf_counter() - t0) * 1000
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw.decode("utf-8", "replace")
    return status, parsed, headers, ms


def shape(body) -> str:
    if isinstance(body, str):
        return "text: " + body.strip().replace("\n", " ")[:90]
    if isinstance(body, list):
        return f"JSON list[{len(body)}]"
    rt = body.get("resourceType")
    if rt == "Bundle":
        links = ",".join(link["relation"] for link in body.get("link", []))
        entries = body.get("entry", [])
        kinds = sorted({e.get("resource", {}).get("resourceType", "?") for e in entries})
        return f"Bundle {body.get('type')} total={body.get('total')} entries={len(entries)} of {kinds} links=[{links}]"
    if rt == "OperationOutcome":
        iss = body.get("issue", [{}])[0]
        text = (iss.get("details") or {}).get("text") or iss.get("diagnostics") or ""
        return f"OperationOutcome {iss.get('severity')}/{iss.get('code')}: {text.splitlines()[0][:80] if text else ''}"
    if rt == "ClaimResponse":
        return f"ClaimResponse id={body.get('id')} outcome={body.get('outcome')} items=" + ",".join(
            a["adjudication"][-1]["reason"]["coding"][0]["display"] for a in body.get("item", [])
        )
    if rt:
        ids = [i.get("value") for i in body.get("identifier", [])]
        return f"{rt} id={body.get('id')} identifiers={ids}"
    if "token" in body:
        return f"{{token: JWT({len(body['token'])} chars), exp: {body.get('exp')}}}"
    return "JSON " + json.dumps(body)[:100]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()

    info = harness.ensure_running()
    base, fhir = info["base_url"], info["fhir_base_url"]
    tokens = {u: harness.login(base, u, p) for u, p in [harness.ADMIN, ("JHOS0011",) * 2, ("RHOS0011",) * 2]}
    admin, jhos, rhos = tokens["Admin"], tokens["JHOS0011"], tokens["RHOS0011"]
    rows, facts = [], {}

    def check(label, method, path, body=None, token=None, reps=None, **kw):
        reps = reps or args.reps
        lat, res = [], None
        for _ in range(reps):
            b = body() if callable(body) else body
            res = call(method, path if path.startswith("http") else fhir + path, b, token, **kw)
            lat.append(res[3])
        status, parsed, headers, _ = res
        rows.append(
            (label, method, path, status, shape(parsed), statistics.median(lat), reps, headers.get("Content-Type"))
        )
        return status, parsed, headers

    jm_uuid = HF["JMHOS001"][0]
    check("login Admin", "POST", "/login/", {"username": "Admin", "password": "admin123"})
    check("login claim admin JHOS0011", "POST", "/login/", {"username": "JHOS0011", "password": "JHOS0011"})
    check("login claim admin RHOS0011", "POST", "/login/", {"username": "RHOS0011", "password": "RHOS0011"})
    check("login wrong password", "POST", "/login/", {"username": "JHOS0011", "password": "x"}, reps=1)
    check("ActivityDefinition page 1", "GET", "/ActivityDefinition/?_count=10", token=admin)
    check("ActivityDefinition page 2", "GET", "/ActivityDefinition/?_count=10&page-offset=2", token=admin)
    check("ActivityDefinition by claim admin", "GET", "/ActivityDefinition/?_count=10", token=jhos)
    check("Medication page", "GET", "/Medication/?_count=10", token=admin)
    check("Medication by claim admin", "GET", "/Medication/?_count=10", token=jhos)
    check("Medication read by UUID", "GET", "/Medication/71efb78b-64ee-4a68-be29-87daf566eb20/", token=admin, reps=1)
    check("Medication search by code", "GET", "/Medication/?identifier=0001", token=admin, reps=1)
    check(
        "ActivityDefinition read by UUID",
        "GET",
        "/ActivityDefinition/de60ca2f-d2d8-4f4e-9f08-f3f718a6fb77/",
        token=admin,
    )
    check("ActivityDefinition default page", "GET", "/ActivityDefinition/", token=admin, reps=1)
    check(
        "ActivityDefinition page past end", "GET", "/ActivityDefinition/?_count=10&page-offset=99", token=admin, reps=1
    )
    check("Location (areas)", "GET", "/Location/?_count=10", token=admin)
    check("Location read by UUID", "GET", "/Location/75250515-40d7-4c77-bafe-a2c65ffc5a72/", token=admin, reps=1)
    check("Location HFs (physicalType=si)", "GET", "/Location/?physicalType=si&_count=20", token=admin)
    check("Organization HFs (type=prov)", "GET", "/Organization/?type=prov&_count=20", token=admin)
    check("Organization by claim admin", "GET", "/Organization/?type=prov&_count=20", token=jhos)
    check("Organization read by UUID", "GET", f"/Organization/{jm_uuid}/", token=admin)
    check("Organization by HF code", "GET", "/Organization/?code=JMHOS001", token=admin)
    check("Patient by identifier", "GET", "/Patient/?identifier=070707070", token=admin)
    check("Patient by identifier (claim admin)", "GET", "/Patient/?identifier=070707070", token=jhos)
    check("Patient read by UUID", "GET", f"/Patient/{harness.INSUREE_070707070_UUID}/", token=admin)

    cer = {
        "resourceType": "CoverageEligibilityRequest",
        "status": "active",
        "purpose": ["benefits"],
        "created": time.strftime("%Y-%m-%d"),
        "patient": {"reference": "Patient/070707070"},
        "insurer": {"reference": "Organization/openIMIS-Implementation"},
        "item": [
            {
                "category": {
                    "coding": [
                        {
                            "system": "https://openimis.github.io/openimis_fhir_r4_ig/CodeSystem/claim-item-category",
                            "code": "service",
                        }
                    ]
                },
                "productOrService": {"text": "M1"},
            },
            {
                "category": {
                    "coding": [
                        {
                            "system": "https://openimis.github.io/openimis_fhir_r4_ig/CodeSystem/claim-item-category",
                            "code": "item",
                        }
                    ]
                },
                "productOrService": {"text": "0001"},
            },
        ],
    }
    check("CoverageEligibilityRequest", "POST", "/CoverageEligibilityRequest/", cer, token=admin)

    _, created, _ = check("POST Claim (Admin)", "POST", "/Claim/", harness.claim_payload, token=admin)
    _, own, _ = check("POST Claim (JHOS0011, own HF)", "POST", "/Claim/", harness.claim_payload, token=jhos, reps=1)

    def foreign_claim():  # JHOS0011 submits a claim naming another facility (RAHOS001) as provider
        c = harness.claim_payload()
        c["provider"]["reference"] = f"Organization/{HF['RAHOS001'][0]}"
        c["provider"]["identifier"]["value"] = HF["RAHOS001"][0]
        return c

    _, foreign, _ = check(
        "POST Claim (JHOS0011, provider RAHOS001)", "POST", "/Claim/", foreign_claim, token=jhos, reps=1
    )

    def m2_claim():  # the same claim with service M2 instead of M1: both lines are accepted
        c = harness.claim_payload()
        c["item"][1]["extension"][0]["valueReference"]["identifier"]["value"] = "M2"
        c["item"][1]["productOrService"]["text"] = "M2"
        return c

    check("POST Claim with service M2", "POST", "/Claim/", m2_claim, token=admin, reps=1)
    check("Claim search by code", "GET", "/Claim/?identifier=JADH0001", token=admin, reps=1)
    check("Claim read by code in path", "GET", "/Claim/JADH0001/", token=admin, reps=1)
    check("Claim read by UUID (demo claim)", "GET", "/Claim/50cf4801-dcb5-43c4-ae68-7c13cc32f5b5/", token=admin)
    check("Practitioner list (claim admins, officers)", "GET", "/Practitioner/?_count=10", token=admin)
    check("Practitioner read (claim admin UUID)", "GET", f"/Practitioner/{HF['JMHOS001'][2]}/", token=admin, reps=1)
    dup = harness.claim_payload()
    call("POST", fhir + "/Claim/", dup, admin)
    check("POST Claim reused code", "POST", "/Claim/", dup, token=admin, reps=1)
    check("POST Claim no trailing slash", "POST", "/Claim", harness.claim_payload, token=admin, reps=1)
    check(
        "POST Claim Content-Type fhir+json",
        "POST",
        "/Claim/",
        harness.claim_payload,
        token=admin,
        reps=1,
        ctype="application/fhir+json",
    )
    check("GET Accept fhir+json", "GET", "/Medication/?_count=1", token=admin, reps=1, accept="application/fhir+json")
    check("GET no trailing slash", "GET", "/Medication?_count=1", token=admin, reps=1)
    check("GET without token", "GET", "/Patient/?identifier=070707070", reps=1)
    check("GET with bad token", "GET", "/Patient/?identifier=070707070", token="x.y.z", reps=1)
    check("GET unknown resource type", "GET", "/Nope/", token=admin, reps=1)
    check("GET unknown id", "GET", "/Claim/00000000-0000-0000-0000-000000000000/", token=admin, reps=1)

    cr_id = created.get("id") if isinstance(created, dict) else None
    facts["created_claim_uuid"] = cr_id
    if cr_id:
        check("ClaimResponse read", "GET", f"/ClaimResponse/{cr_id}/", token=admin)
        check("ClaimResponse read (JHOS0011, same HF)", "GET", f"/ClaimResponse/{cr_id}/", token=jhos)
        check("ClaimResponse read (RHOS0011, other HF)", "GET", f"/ClaimResponse/{cr_id}/", token=rhos, reps=1)
        check("Claim read (RHOS0011, other HF)", "GET", f"/Claim/{cr_id}/", token=rhos, reps=1)
    check("Claim list (Admin)", "GET", "/Claim/?_count=10", token=admin)
    check("Claim list (JHOS0011)", "GET", "/Claim/?_count=10", token=jhos)
    check(
        "Claim by patient (JHOS0011)", "GET", f"/Claim/?patient={harness.INSUREE_070707070_UUID}&_count=10", token=jhos
    )
    check("ClaimResponse list (JHOS0011)", "GET", "/ClaimResponse/?_count=10", token=jhos)

    # A claim of another facility of the same district as JMHOS001 (JMHC001, district Jambero), by Admin
    def jmhc_claim():
        c = harness.claim_payload()
        c["provider"]["reference"] = f"Organization/{HF['JMHC001'][0]}"
        c["provider"]["identifier"]["value"] = HF["JMHC001"][0]
        c["enterer"]["reference"] = f"Practitioner/{HF['JMHC001'][2]}"
        c["enterer"]["identifier"]["value"] = HF["JMHC001"][2]
        return c

    _, jmhc, _ = check("POST Claim (Admin) for JMHC001", "POST", "/Claim/", jmhc_claim, token=admin, reps=1)
    if isinstance(jmhc, dict) and jmhc.get("id"):
        check("Claim read (JHOS0011, JMHC001 claim, same district)", "GET", f"/Claim/{jmhc['id']}/", token=jhos, reps=1)
        check(
            "ClaimResponse read (JHOS0011, JMHC001 claim)", "GET", f"/ClaimResponse/{jmhc['id']}/", token=jhos, reps=1
        )

    # Which facilities' claims does each user see? Claim lists break on demo claims without insurance
    # (500 "malformed entry"), so walk the ClaimResponse list and map ids to facilities in the database.
    cfg = harness.Config()
    hf_of = {}
    for line in harness._psql(
        cfg,
        'select c."ClaimUUID", h."HFCode" from "tblClaim" c join "tblHF" h '
        'on h."HfID" = c."HFID" where c."ValidityTo" is null',
        db=cfg.db_name,
    ).splitlines():
        cu, code = line.split("|")
        hf_of[cu.lower()] = code

    def visible(token):
        seen, url = {}, fhir + "/ClaimResponse/?_count=100"
        while url:
            st, b, _, _ = call("GET", url, token=token)
            if st != 200:
                return {"status": st}
            for e in b.get("entry", []):
                hf = hf_of.get(e["resource"]["id"].lower(), "?")
                seen[hf] = seen.get(hf, 0) + 1
            url = next((link["url"] for link in b.get("link", []) if link["relation"] == "next"), None)
        return dict(sorted(seen.items()))

    facts["claims_in_db_by_hf"] = {}
    for code in hf_of.values():
        facts["claims_in_db_by_hf"][code] = facts["claims_in_db_by_hf"].get(code, 0) + 1
    facts["claims_visible_via_ClaimResponse_list"] = {u: visible(t) for u, t in tokens.items()}
    req = urllib.request.Request(
        fhir + "/Medication/?_count=1",
        headers={"Authorization": "Bearer " + admin, "Host": "mediator.example:8443", "X-Forwarded-Proto": "https"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        facts["bundle_links_with_Host_and_X-Forwarded-Proto"] = [link["url"] for link in json.loads(r.read())["link"]]
    facts["memory"] = harness.server_memory(info["pid"])
    facts["versions"] = {
        k: v
        for k, v in info["versions"].items()
        if k.lower() in ("openimis-be-core", "openimis-be-api_fhir_r4", "openimis-be-claim", "django", "gunicorn")
    }
    facts["claim_posted_by_jhos_own_hf"] = shape(own)
    facts["claim_posted_by_jhos_foreign_hf"] = shape(foreign)

    print("| check | request | status | response shape | median ms (n) |")
    print("|---|---|---|---|---|")
    for label, method, path, status, summary, med, n, _ctype in rows:
        print(f"| {label} | `{method} {path}` | {status} | {summary.replace('|', '/')} | {med:.0f} ({n}) |")
    print()
    print(json.dumps(facts, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "facts": facts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
