"""A development certificate authority: a CA, the broker's certificate and client certificates, so that
TLS works out of the box. For a fleet in production use certificates from your own PKI instead.

Keys are EC P-256 (fast on a Raspberry Pi, accepted by Mosquitto and Python's ssl); key files are 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgegan import topics

CA_DAYS = 3650
LEAF_DAYS = 825  # the longest lifetime Apple and browsers accept for a server certificate
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Issued:
    name: str
    certificate: Path
    key: Path


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(handle, "wb") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(pem)


def write_certificate(path: Path, certificate: x509.Certificate) -> None:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o644)


def subject_alternative_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def certificate_builder(subject: str, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clock skew between machines
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def load_or_create_ca(out: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA in `out` (ca.crt, ca.key) if there is one, so that later certificates join the same chain."""
    cert_path, key_path = out / "ca.crt", out / "ca.key"
    if cert_path.exists() and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not an EC key written by `edgegan certs`")
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    name = "EdgeGAN development CA"
    certificate = (
        certificate_builder(name, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]),
                            key.public_key(), CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    write_key(key_path, key)
    write_certificate(cert_path, certificate)
    return key, certificate


def issue(
    out: Path, name: str, ca_key, ca: x509.Certificate, usage: x509.ObjectIdentifier, hosts: list[str]
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        certificate_builder(name, ca.subject, key.public_key(), LEAF_DAYS)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(subject_alternative_names(hosts)), critical=False
        )
    issued = Issued(name, out / f"{name}.crt", out / f"{name}.key")
    write_key(issued.key, key)
    write_certificate(issued.certificate, builder.sign(ca_key, hashes.SHA256()))
    return issued


def make_development_pki(out: Path, hosts: list[str], clients: list[str]) -> list[Issued]:
    """ca.crt/ca.key (reused if present), server.crt/server.key valid for `hosts`, and NAME.crt/NAME.key
    for each client, whose common name is NAME (Mosquitto's `use_identity_as_username` reads it)."""
    for client in clients:
        topics.check_name("client", client)
        if client in ("ca", "server"):
            raise ValueError(f"a client cannot be called {client!r}: that file belongs to the {client}")
    if not hosts:
        raise ValueError("--hosts needs at least one host name or address of the broker")
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca = load_or_create_ca(out)
    issued = [Issued("ca", out / "ca.crt", out / "ca.key")]
    issued.append(issue(out, "server", ca_key, ca, ExtendedKeyUsageOID.SERVER_AUTH, hosts))
    for client in clients:
        issued.append(issue(out, client, ca_key, ca, ExtendedKeyUsageOID.CLIENT_AUTH, []))
    return issued
