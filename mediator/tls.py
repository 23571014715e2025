"""TLS contexts for the listener: modern protocols and AEAD ciphers only."""

from __future__ import annotations

import ssl
from pathlib import Path

from mediator.config.models import TlsConfig

# Mozilla "intermediate" TLS 1.2 suites (ECDHE + AEAD); TLS 1.3 suites are all acceptable.
TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])


def server_context(tls: TlsConfig, root: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(root / tls.cert_file, root / tls.key_file)
    if tls.client_ca_file:
        context.load_verify_locations(cafile=str(root / tls.client_ca_file))
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context
