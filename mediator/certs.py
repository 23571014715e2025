"""Development PKI: a CA, a server certificate and client certificates, made with `cryptography`.

For development and tests only; production certificates come from the operator's PKI. Private keys
are written with mode 0600 and are git-ignored (certs/.gitignore).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True, slots=True)
class Issued:
    cert_path: Path
    key_path: Path
    fingerprint_sha256: str


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "openIMIS Mediator dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("ca.key is not an EC key")
    return cert, key


def ensure_ca(folder: Path, days: int = 3650) -> Issued:
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "ca.crt").exists() and (folder / "ca.key").exists():
        cert, _ = _load_ca(folder)
        return Issued(folder / "ca.crt", folder / "ca.key", fingerprint(cert))
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("openIMIS Mediator dev CA"))
            .issuer_name(_name("openIMIS Mediator dev CA")).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_key(folder / "ca.key", key)
    (folder / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(folder / "ca.crt", folder / "ca.key", fingerprint(cert))


def issue(folder: Path, name: str, *, server: bool, hosts: tuple[str, ...] = (), days: int = 825) -> Issued:
    """Issue `<name>.crt`/`<name>.key` signed by the folder's CA (made if missing)."""
    ensure_ca(folder)
    ca_cert, ca_key = _load_ca(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if hosts:
        alt: list[x509.GeneralName] = []
        for host in hosts:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(folder / f"{name}.key", key)
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(folder / f"{name}.crt", folder / f"{name}.key", fingerprint(cert))


def make_dev_pki(folder: Path, clients: tuple[str, ...] = ("vendor-a", "vendor-b")) -> list[Issued]:
    """CA + server (localhost, 127.0.0.1, ::1) + one client certificate per name. Idempotent for the CA."""
    issued = [ensure_ca(folder), issue(folder, "server", server=True, hosts=("localhost", "127.0.0.1", "::1"))]
    issued += [issue(folder, client, server=False) for client in clients]
    return issued
