"""A local openIMIS stand-in for `make run` on an empty machine. A development aid only.

It serves the openIMIS FHIR R4 fixture resources (copied from openIMIS's own test data, AGPL-3.0,
see fixtures/README.md) with openIMIS's URL layout and quirks: `POST login/` → {"token","exp"},
Bearer tokens, trailing slashes (GET without one → 301, POST without one → 500), `_count` and
`page-offset` paging, a bare resource (not a Bundle) for `?identifier=` and `?code=`, unknown
search parameters ignored, 415/406 for application/fhir+json, and errors as OperationOutcome.
For the master-data replica it also keeps a change time per resource, served as meta.lastUpdated, filters
lists with `_lastUpdated=<prefix><%Y-%m-%dT%H:%M:%S>` (naive, read as UTC; any other format is a 500, as
openIMIS's strptime makes it), orders lists by change time (openIMIS orders by validity_from), and builds
the code systems `CodeSystem/medical-item/` and `CodeSystem/medical-service/` from its items and services.
It also answers the three GraphQL queries the mediator's claim index sends (`POST /api/graphql`,
recognised by operation name: MediatorClaimOwner, MediatorClaimPage, MediatorClaimOwners), from its Claims
(uuid = id, code = the `Code` identifier, facility = the provider's Organization, order = change time);
it is not a GraphQL server.
The security of the mediator is proven against real openIMIS (tests/openimis), never against this.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import time
import uuid
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from aiohttp import web

BASE_PATH = "/api/api_fhir_r4/"
GRAPHQL_PATH = "/api/graphql"
DEFAULT_USERS = {"Admin": "admin123"}
TOKEN_LIFETIME_S = 86400  # openIMIS tokens live one day


def _outcome(status: int, text: str) -> web.Response:
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "exception", "details": {"text": text}}]}
    return web.json_response(body, status=status)


def load_fixtures() -> dict[str, dict[str, dict[str, Any]]]:
    """resourceType -> id -> resource. Fixtures without an id get a stable one from their identifier."""
    store: dict[str, dict[str, dict[str, Any]]] = {}
    folder = resources.files("mediator.sandbox") / "fixtures"
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        resource = json.loads(entry.read_text(encoding="utf-8"))
        rtype = resource["resourceType"]
        if rtype == "OperationOutcome":
            continue
        if not resource.get("id"):
            resource["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, entry.name))
        store.setdefault(rtype, {})[resource["id"]] = resource
    return store


def _codes(resource: dict[str, Any]) -> set[str]:
    values = {i.get("value") for i in resource.get("identifier") or () if isinstance(i, dict)}
    code = resource.get("code")
    if isinstance(code, dict):
        values |= {c.get("code") for c in code.get("coding") or () if isinstance(c, dict)}
    return {v for v in values if isinstance(v, str)}


class OpenImisSandbox:
    """State of the stand-in: resources, issued tokens and a request log (for tests that inspect it)."""

    def __init__(self, users: dict[str, str] | None = None) -> None:
        self.users = users if users is not None else dict(DEFAULT_USERS)
        self.store = load_fixtures()
        self.tokens: dict[str, float] = {}
        self.requests: list[dict[str, Any]] = []
        self.logins = 0
        started = time.time()
        self.updated: dict[tuple[str, str], float] = {(t, i): started for t, by_id in self.store.items() for i in by_id}
        self.failing_types: set[str] = set()
        """Lists of these types answer 500, as openIMIS does when its database misbehaves (tests use it)."""

    def upsert(self, resource: dict[str, Any], when: float | None = None) -> None:
        """Create or change a resource, as an openIMIS user would; it moves to the end of the list order."""
        rtype, rid = resource["resourceType"], resource["id"]
        self.store.setdefault(rtype, {}).pop(rid, None)
        self.store[rtype][rid] = resource
        self.updated[(rtype, rid)] = time.time() if when is None else when

    def remove(self, rtype: str, rid: str) -> None:
        """openIMIS deletes by setting validity_to; the row then vanishes from every list."""
        del self.store[rtype][rid]
        self.updated.pop((rtype, rid), None)

    def generate_medications(self, count: int) -> None:
        """`count` extra medical items (benchmarks, paging tests), cloned from the fixture item."""
        template = next(iter(self.store["Medication"].values()))
        for n in range(count):
            item = copy.deepcopy(template)
            item["id"] = str(uuid.uuid5(uuid.NAMESPACE_OID, f"generated-medication-{n}"))
            item["identifier"][0]["value"] = f"GEN{n:06d}"
            item["code"] = {"text": f"GENERATED ITEM {n} TABS {100 + n % 900}MG"}
            self.upsert(item)

    def _served(self, rtype: str, resource: dict[str, Any]) -> dict[str, Any]:
        changed = self.updated.get((rtype, resource["id"]))
        if changed is None:
            return resource
        meta = {**(resource.get("meta") or {}), "lastUpdated": datetime.fromtimestamp(changed, UTC).isoformat()}
        return {**resource, "meta": meta}

    def _last_updated_filter(self, value: str) -> Any:
        operators = {"eq": float.__eq__, "ne": float.__ne__, "gt": float.__gt__, "lt": float.__lt__,
                     "ge": float.__ge__, "le": float.__le__}
        prefix = value[:2] if value[:2] in operators else "eq"
        text = value[2:] if value[:2] in operators else value
        # openIMIS: datetime.strptime(value, "%Y-%m-%dT%H:%M:%S"); a ValueError surfaces as a 500.
        moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
        return lambda changed: operators[prefix](changed, moment)

    def code_system(self, request: web.Request, name: str) -> web.Response:
        source = {"medical-item": ("Medication", "MedicalItemCS", "Medical Item"),
                  "medical-service": ("ActivityDefinition", "MedicalServiceCS", "Medical Service")}.get(name)
        if source is None:
            return _outcome(404, "Not found.")
        rtype, cs_name, title = source
        concepts = []
        for resource in self.store.get(rtype, {}).values():
            codes = [i.get("value") for i in resource.get("identifier") or ()
                     if any(c.get("code") == "Code" for c in (i.get("type") or {}).get("coding") or ())]
            display = resource.get("title") or (resource.get("code") or {}).get("text") or resource.get("name")
            if codes:
                concepts.append({"code": codes[0], "display": display})
        return web.json_response({
            "resourceType": "CodeSystem", "id": name, "url": f"{request.scheme}://{request.host}{request.path}",
            "name": cs_name, "title": title, "status": "active", "content": "complete",
            "count": len(concepts), "concept": concepts})

    def _authorised(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return False
        expiry = self.tokens.get(header[7:])
        return expiry is not None and expiry > time.time()

    async def login(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except ValueError:
            return _outcome(500, "JSON parse error")
        if not isinstance(data, dict) or self.users.get(data.get("username")) != data.get("password"):
            return web.json_response({"detail": "Invalid credentials"}, status=401)
        token = secrets.token_urlsafe(24)
        exp = int(time.time()) + TOKEN_LIFETIME_S
        self.tokens[token] = exp
        self.logins += 1
        return web.json_response({"token": token, "exp": exp})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rel = request.path[len(BASE_PATH):]
        self.requests.append({"method": request.method, "path": request.path,
                              "query": request.query_string, "headers": dict(request.headers)})
        if rel == "login/" and request.method == "POST":
            return await self.login(request)
        if not request.path.endswith("/"):
            if request.method == "GET":
                raise web.HTTPMovedPermanently(request.path + "/" + (
                    "?" + request.query_string if request.query_string else ""))
            return _outcome(500, "RuntimeError: You called this URL via POST, but the URL doesn't end in a slash")
        if "application/fhir+json" in request.headers.get("Accept", ""):
            return _outcome(406, 'Could not satisfy the request Accept header.')
        if not self._authorised(request):
            return web.json_response({"detail": "Authentication credentials were not provided."}, status=401)
        parts = [p for p in rel.split("/") if p]
        if not parts:
            return _outcome(404, "Not found.")
        rtype = parts[0]
        if rtype == "CodeSystem" and len(parts) == 2 and request.method == "GET":
            return self.code_system(request, parts[1])
        if rtype == "metadata" and request.method == "GET":
            return web.json_response({"resourceType": "CapabilityStatement", "status": "active",
                                      "kind": "instance", "fhirVersion": "4.0.1", "format": ["json"]})
        if request.method in ("POST", "PUT") and request.content_type == "application/fhir+json":
            return _outcome(415, 'Unsupported media type "application/fhir+json" in request.')
        if rtype not in self.store and rtype not in ("Claim", "CoverageEligibilityRequest"):
            return _outcome(404, "Not found.")
        if len(parts) == 1 and request.method == "GET":
            return self.search(request, rtype)
        if len(parts) == 1 and request.method == "POST":
            return await self.create(request, rtype)
        if len(parts) == 2 and request.method == "GET":
            found = self.lookup(rtype, parts[1])
            return web.json_response(self._served(rtype, found)) if found else \
                _outcome(404, f"{rtype} matching query does not exist.")
        return _outcome(405, f'Method "{request.method}" not allowed.')

    def _claim_node(self, claim: dict[str, Any]) -> dict[str, Any] | None:
        codes = [i.get("value") for i in claim.get("identifier") or ()
                 if any(c.get("code") == "Code" for c in (i.get("type") or {}).get("coding") or ())]
        reference = str((claim.get("provider") or {}).get("reference", ""))
        org = self.lookup("Organization", reference.split("/")[-1]) if reference.startswith("Organization/") else None
        if org is None or not isinstance(claim.get("id"), str):
            return None
        org_uuid = next((i.get("value") for i in org.get("identifier") or ()
                         if any(c.get("code") == "UUID" for c in (i.get("type") or {}).get("coding") or ())),
                        org["id"])
        org_code = next(iter(sorted(_codes(org))), "")
        changed = self.updated.get(("Claim", claim["id"]), 0.0)
        return {"uuid": claim["id"], "code": codes[0] if codes else claim["id"],
                "validityFrom": datetime.fromtimestamp(changed, UTC).replace(tzinfo=None).isoformat(),
                "healthFacility": {"uuid": org_uuid, "code": org_code},
                "_patient": str((claim.get("patient") or {}).get("reference", "")).split("/")[-1]}

    def _claim_nodes(self) -> list[dict[str, Any]]:
        claims = sorted(self.store.get("Claim", {}).values(), key=lambda r: self.updated.get(("Claim", r["id"]), 0.0))
        return [n for n in (self._claim_node(c) for c in claims) if n is not None]

    @staticmethod
    def _connection(nodes: list[dict[str, Any]], total: bool = False) -> dict[str, Any]:
        found: dict[str, Any] = {"edges": [{"node": {k: v for k, v in n.items() if not k.startswith("_")}}
                                           for n in nodes]}
        if total:
            found["totalCount"] = len(nodes)
        return found

    async def graphql(self, request: web.Request) -> web.Response:
        self.requests.append({"method": request.method, "path": request.path, "query": "",
                              "headers": dict(request.headers)})
        if not self._authorised(request):
            return web.json_response({"errors": [{"message": "unauthorized"}]}, status=401)
        try:
            document = await request.json()
        except ValueError:
            return web.json_response({"errors": [{"message": "invalid JSON"}]}, status=400)
        query = str(document.get("query", ""))
        variables = document.get("variables") or {}
        nodes = self._claim_nodes()
        if "MediatorClaimOwners" in query:
            ids = re.findall(r'(c\d+): claims\(uuid: "([^"]+)"', query)
            return web.json_response({"data": {alias: self._connection([n for n in nodes if n["uuid"] == cid])
                                               for alias, cid in ids}})
        if "MediatorClaimOwner" in query:
            key = variables.get("key")
            return web.json_response({"data": {"byUuid": self._connection([n for n in nodes if n["uuid"] == key]),
                                               "byCode": self._connection([n for n in nodes if n["code"] == key])}})
        if "MediatorClaimPage" in query:
            chosen = [n for n in nodes if n["healthFacility"]["uuid"].lower() == str(variables.get("hf")).lower()
                      and variables.get("patient") in (None, n["_patient"])
                      and variables.get("code") in (None, n["code"]) and variables.get("uuid") in (None, n["uuid"])]
            first, offset = int(variables.get("first", 100)), int(variables.get("offset", 0))
            page = self._connection(chosen[offset:offset + first])
            page["totalCount"] = len(chosen)
            return web.json_response({"data": {"claims": page}})
        return web.json_response({"errors": [{"message": "the stand-in answers only the mediator's queries"}]})

    def lookup(self, rtype: str, key: str) -> dict[str, Any] | None:
        resources_ = self.store.get(rtype, {})
        if key in resources_:
            return resources_[key]
        lowered = key.lower()
        for resource in resources_.values():
            if lowered in {c.lower() for c in _codes(resource)}:
                return resource
        return None

    def search(self, request: web.Request, rtype: str) -> web.Response:
        key = request.query.get("identifier") or request.query.get("code")
        if key is not None:
            # openIMIS answers a bare resource here, not a searchset Bundle.
            found = self.lookup(rtype, key.split("|")[-1])
            return web.json_response(self._served(rtype, found)) if found else \
                _outcome(404, f"{rtype} matching query does not exist.")
        if rtype in self.failing_types:
            return _outcome(500, "OperationalError: the database is not available")
        everything = sorted(self.store.get(rtype, {}).values(),
                            key=lambda r: self.updated.get((rtype, r["id"]), 0.0))
        if "_lastUpdated" in request.query:
            try:
                keep = self._last_updated_filter(request.query["_lastUpdated"])
            except ValueError:
                return _outcome(500, "_lastUpdated value is not a valid datetime")
            everything = [r for r in everything if keep(self.updated.get((rtype, r["id"]), 0.0))]
        try:
            count = max(1, min(int(request.query.get("_count", "10")), 100))
            page = max(1, int(request.query.get("page-offset", "1")))
        except ValueError:
            return _outcome(500, "invalid literal for int() with base 10")
        chunk = everything[(page - 1) * count: page * count]
        base = f"{request.scheme}://{request.host}{BASE_PATH}{rtype}/"
        links = [{"relation": "self", "url": f"{base}?_count={count}&page-offset={page}"}]
        if page * count < len(everything):
            links.append({"relation": "next", "url": f"{base}?_count={count}&page-offset={page + 1}"})
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(everything), "link": links,
                  "entry": [{"fullUrl": f"{base}{r['id']}", "resource": self._served(rtype, r)} for r in chunk]}
        return web.json_response(bundle)

    async def create(self, request: web.Request, rtype: str) -> web.Response:
        try:
            resource = await request.json()
        except ValueError:
            return _outcome(500, "JSON parse error - Expecting value")
        if not isinstance(resource, dict) or resource.get("resourceType") != rtype:
            return _outcome(500, "KeyError: 'resourceType'")
        if rtype == "CoverageEligibilityRequest":
            answer = copy.deepcopy(next(iter(self.store["CoverageEligibilityResponse"].values())))
            answer["id"] = str(uuid.uuid4())
            return web.json_response(answer, status=201)
        claim_id = str(uuid.uuid4())
        resource["id"] = claim_id
        self.store.setdefault(rtype, {})[claim_id] = resource
        if rtype == "Claim":
            response = copy.deepcopy(next(iter(self.store["ClaimResponse"].values())))
            response["id"] = claim_id  # openIMIS: ClaimResponse id == Claim id
            self.store["ClaimResponse"][claim_id] = response
            return web.json_response(response, status=201)
        return web.json_response(resource, status=201)


SANDBOX = web.AppKey("sandbox", OpenImisSandbox)


def build_sandbox_app(sandbox: OpenImisSandbox | None = None) -> web.Application:
    sandbox = sandbox or OpenImisSandbox()
    app = web.Application()
    app[SANDBOX] = sandbox
    app.router.add_route("*", BASE_PATH + "{tail:.*}", sandbox.handle)
    app.router.add_post(GRAPHQL_PATH, sandbox.graphql)
    return app

