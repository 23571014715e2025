"""The client side of SMART Backend Services, for development and tests: mint a client assertion
(RFC 7523) with a vendor's private key and exchange it at /auth/token (`openimis-mediator token`)."""

from __future__ import annotations

import json
import ssl
import time
import urllib.parse
import urllib.request
import uuid
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey, OKPKey, RSAKey

from mediator.identity.token_service import ASSERTION_TYPE

_ALGORITHM_FOR_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}


def load_private_key(pem: bytes) -> RSAKey | ECKey | OKPKey:
    for cls in (ECKey, RSAKey, OKPKey):
        try:
            key = cls.import_key(pem)
        except (ValueError, TypeError, Exception):  # joserfc raises several types for "not this kind"
            continue
        if key.is_private:
            return key
    raise ValueError("not a PEM private key (EC, RSA or Ed25519)")


def algorithm_for(key: RSAKey | ECKey | OKPKey) -> str:
    if isinstance(key, ECKey):
        return _ALGORITHM_FOR_CURVE[key.curve_name]
    if isinstance(key, RSAKey):
        return "RS384"
    return "EdDSA"


def client_assertion(client_id: str, key: RSAKey | ECKey | OKPKey, token_url: str, *,
                     lifetime_s: int = 120, kid: str | None = None) -> str:
    now = int(time.time())
    header: dict[str, Any] = {"alg": algorithm_for(key), "typ": "JWT"}
    if kid:
        header["kid"] = kid
    claims = {"iss": client_id, "sub": client_id, "aud": token_url, "iat": now, "exp": now + lifetime_s,
              "jti": uuid.uuid4().hex}
    return jwt.encode(header, claims, key, algorithms=[header["alg"]])


def token_form(assertion: str, scope: str) -> dict[str, str]:
    return {"grant_type": "client_credentials", "scope": scope, "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion}


def request_token(token_url: str, client_id: str, key_pem: bytes, scope: str,
                  cafile: str | None = None, cert: tuple[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """POST the form with the standard library (no event loop needed in a CLI)."""
    assertion = client_assertion(client_id, load_private_key(key_pem), token_url)
    data = urllib.parse.urlencode(token_form(assertion, scope)).encode()
    context = ssl.create_default_context(cafile=cafile) if token_url.startswith("https") else None
    if context is not None and cert is not None:
        context.load_cert_chain(*cert)
    request = urllib.request.Request(token_url, data=data, method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")
