"""The stand-in must behave like openIMIS where the mediator depends on it (facts in the README)."""

import json


async def _token(client):
    response = await client.post("/api/api_fhir_r4/login/", json={"username": "Admin", "password": "admin123"})
    assert response.status == 200
    body = await response.json()
    assert set(body) == {"token", "exp"}
    return {"Authorization": f"Bearer {body['token']}"}


async def test_openimis_quirks(sandbox_server, aiohttp_client):
    from aiohttp.test_utils import TestClient

    client = TestClient(sandbox_server)
    await client.start_server()
    try:
        assert (await client.post("/api/api_fhir_r4/login/", json={"username": "Admin", "password": "x"})).status == 401
        assert (await client.get("/api/api_fhir_r4/Medication/")).status == 401
        auth = await _token(client)
        redirect = await client.get("/api/api_fhir_r4/Medication", headers=auth, allow_redirects=False)
        assert redirect.status == 301
        no_slash_post = await client.post("/api/api_fhir_r4/Claim", headers=auth, json={"resourceType": "Claim"})
        assert no_slash_post.status == 500
        fhir_json = await client.post("/api/api_fhir_r4/Claim/",
                                      headers={**auth, "Content-Type": "application/fhir+json"},
                                      data=json.dumps({"resourceType": "Claim"}))
        assert fhir_json.status == 415
        fhir_accept = {**auth, "Accept": "application/fhir+json"}
        assert (await client.get("/api/api_fhir_r4/Medication/", headers=fhir_accept)).status == 406
        bare = await client.get("/api/api_fhir_r4/Patient/?identifier=123456789", headers=auth)
        assert (await bare.json())["resourceType"] == "Patient"
        page = await (await client.get("/api/api_fhir_r4/Practitioner/?_count=1&page-offset=2", headers=auth)).json()
        assert page["resourceType"] == "Bundle" and len(page["entry"]) == 1
        assert page["total"] == 3
        assert any(link["relation"] == "next" for link in page["link"])
    finally:
        await client.close()
