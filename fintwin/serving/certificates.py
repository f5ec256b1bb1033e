"""A throwaway certificate authority for development and tests (never for production).

``write_development_pki(directory, hosts)`` writes, all PEM: ``ca.crt``/``ca.key`` (a CA
valid for ``days``), ``server.crt``/``server.key`` (for ``hosts``: IP addresses or DNS names)
and ``client.crt``/``client.key`` (a client certificate for mutual TLS), keys readable by
the owner only. Production certificates come from the organisation's CA (see README, Security).

    python -m fintwin.serving.certificates certs/ 127.0.0.1 localhost
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fintwin.files import write_atomic


@dataclass(frozen=True)
class Pki:
    """Paths of a development CA, a server and a client certificate with their keys."""

    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_alternative_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_pair(directory: Path, stem: str, key: ec.EllipticCurvePrivateKey,
                certificate: x509.Certificate) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    write_atomic(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
    write_atomic(key_path, key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), mode=0o600)
    return cert_path, key_path


def _certificate(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                 days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def write_development_pki(directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                          days: int = 30, name: str = "fintwin development") -> Pki:
    """Write a new CA, a server certificate for ``hosts`` and a client certificate (P-256
    keys, SHA-256 signatures) into ``directory``; return their paths."""
    if not hosts:
        raise ValueError("the server certificate needs at least one host")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{name} CA")
    ca = (
        _certificate(ca_name, ca_key, ca_name, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, ca_key_path = _write_pair(directory, "ca", ca_key, ca)
    issued = {}
    for stem, usage, names in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH, [_subject_alternative_name(h) for h in hosts]),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName(f"{name} client".replace(" ", "-"))]),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            _certificate(_name(f"{name} {stem}"), key, ca_name, days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        issued[stem] = _write_pair(directory, stem, key, certificate)
    return Pki(ca_path, ca_key_path, *issued["server"], *issued["client"])


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m fintwin.serving.certificates DIR [HOST ...]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("hosts", nargs="*", default=["127.0.0.1", "localhost"],
                        help="IP addresses and DNS names of the server certificate")
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args(argv)
    pki = write_development_pki(args.directory, args.hosts, args.days)
    print(f"wrote {pki.ca}, {pki.server_cert}, {pki.client_cert} and their keys")


if __name__ == "__main__":
    main()
