"""Key material: the mediator's own signing key, configured public keys, and cached remote JWKS.

The signing key is read from (or generated into, mode 0600) a file so that every instance sharing the
file issues tokens every other instance accepts. Public keys come only from configuration: a PEM
file, a certificate, a JWKS file, or a JWKS URL fetched by `JwksCache`, never from a token header.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, OKPKey, RSAKey

from mediator.errors import MediatorError
from mediator.logs import JsonEvent

log = logging.getLogger("mediator.identity")

SIGNING_ALGORITHM = "ES256"
ACCESS_TOKEN_TYPE = "at+jwt"
"""Header typ of the mediator's access tokens (RFC 9068): no other JWT passes as one."""
MAX_JWKS_BYTES = 64 * 1024
PUBLIC_KEY_TYPES = ("RSA", "EC", "OKP")


class KeyFileError(MediatorError):
    """A configured key file is missing or unusable; raised at start, never per request."""


def load_or_create_signing_key(path: Path) -> ECKey:
    """The mediator's access-token signing key; generated (EC P-256, mode 0600) if the file is absent."""
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another instance made it between our check and open; read theirs
        except OSError as exc:  # a read-only configuration (a mounted ConfigMap): say so, do not crash
            raise KeyFileError(f"{path}: absent and cannot be created ({exc.strerror or type(exc).__name__}); "
                               "mount the signing key there or make its directory writable") from None
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            log.info(JsonEvent.of("identity.signing_key_generated", path=str(path)))
    return _read_signing_key(path)


def _read_signing_key(path: Path) -> ECKey:
    try:
        signing = ECKey.import_key(path.read_bytes())
    except (OSError, JoseError, ValueError) as exc:
        raise KeyFileError(f"{path}: not a readable EC private key ({type(exc).__name__})") from None
    if not signing.is_private or signing.curve_name != "P-256":
        raise KeyFileError(f"{path}: the signing key must be an EC P-256 private key")
    signing.ensure_kid()
    return signing


def check_signing_key(path: Path) -> None:
    """What `load_or_create_signing_key` would refuse, found without writing anything: a file there that
    is not an EC P-256 private key, or no file and no way to make one (KeyFileError)."""
    if path.exists():
        _read_signing_key(path)
        return
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise KeyFileError(f"{path}: absent and cannot be created ({ancestor} is not a writable directory); "
                           "mount the signing key there or make its directory writable")


def public_jwks(signing: ECKey) -> dict[str, Any]:
    public: dict[str, Any] = dict(signing.as_dict(private=False))
    public.update({"kid": signing.kid, "use": "sig", "alg": SIGNING_ALGORITHM})
    return {"keys": [public]}


def load_public_key_file(path: Path) -> KeySet:
    """A PEM public key, or a PEM certificate whose public key is used. Private keys are refused:
    they do not belong in the mediator's configuration."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read ({exc.strerror})") from None
    if b"PRIVATE KEY" in data:
        raise KeyFileError(f"{path}: holds a private key; configure the public key or certificate")
    try:
        if b"BEGIN CERTIFICATE" in data:
            data = x509.load_pem_x509_certificate(data).public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        key: RSAKey | ECKey | OKPKey
        for cls in (ECKey, RSAKey, OKPKey):
            try:
                key = cls.import_key(data)
                break
            except (JoseError, ValueError, TypeError):
                continue
        else:
            raise ValueError("not a supported public key")
    except ValueError as exc:
        raise KeyFileError(f"{path}: {exc}") from None
    return KeySet([key])


def parse_jwks(document: object) -> KeySet:
    """Public asymmetric keys only: `oct` (HMAC) keys and private parameters are dropped/refused."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys = []
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") not in PUBLIC_KEY_TYPES:
            continue
        if entry.get("use", "sig") != "sig" or "d" in entry:
            continue
        try:
            keys.append(KeySet.import_key_set({"keys": [entry]}).keys[0])
        except (JoseError, ValueError, TypeError, KeyError):
            continue
    if not keys:
        raise ValueError("no usable public signing key in the JWKS")
    return KeySet(keys)


def load_jwks_file(path: Path) -> KeySet:
    try:
        return parse_jwks(json.loads(path.read_text()))
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise KeyFileError(f"{path}: {exc}") from None


class JwksCache:
    """Keys of one JWKS URL: fetched at start, refreshed every `refresh_s` by a background task
    (started from the app's cleanup_ctx), refetched at most once per `min_refetch_s` when a token
    names an unknown kid, and never emptied by a failed fetch (last good keys are kept).

    Lifetime: one per URL per application; used from the event loop only.
    """

    def __init__(self, url: str, refresh_s: float, min_refetch_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.refresh_s = refresh_s
        self.min_refetch_s = min_refetch_s
        self.keys: KeySet | None = None
        self.fetches = 0
        self._clock = clock
        self._last_refetch: float | None = None
        """When an unknown kid last caused a fetch; scheduled refreshes do not count, so a key rotated
        in just after one is still fetched on first sight."""
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        await self._fetch()
        self._task = asyncio.create_task(self._refresh_forever(), name=f"jwks refresh {self.url}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self._fetch()

    async def refetch_for_unknown_kid(self) -> bool:
        """Fetch again unless a fetch was attempted less than min_refetch_s ago. Concurrent callers
        share one fetch. True if a fetch was made (whatever its outcome)."""
        async with self._lock:
            if self._last_refetch is not None and self._clock() - self._last_refetch < self.min_refetch_s:
                return False
            self._last_refetch = self._clock()
            await self._fetch_locked()
            return True

    async def _fetch(self) -> None:
        async with self._lock:
            await self._fetch_locked()

    async def _fetch_locked(self) -> None:
        self.fetches += 1
        if self._session is None:
            return
        try:
            async with self._session.get(self.url, allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=5)) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                body = await response.content.read(MAX_JWKS_BYTES + 1)
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("JWKS larger than 64 KiB")
                self.keys = parse_jwks(json.loads(body))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # Keep the last good keys: an IdP outage must not log every user out.
            log.warning(JsonEvent.of("identity.jwks_fetch_failed", url=self.url, error=type(exc).__name__,
                                      detail=str(exc), keeping="last_good_keys" if self.keys else "no_keys"))
