"""Transport security and access control of served models.

TLS: the embedded server's gRPC endpoint speaks TLS (``ServerTls``; mutual TLS with a client CA)
and its HTTP and metrics endpoints then bind loopback only, for a TLS-terminating proxy in front
(serve/docker-compose.yml). Clients give ``ClientCredentials``: the CA that signed the server's
certificate, their own certificate and key for mutual TLS, and the API key.

Access control uses tritonserver's restricted APIs: a request to a restricted API category
must carry a header with the expected value. The administrative categories (``ADMIN_APIS``)
are always restricted, to the admin key (a random one, known only to the process that started
the server, when none is given); with an API key, inference, model metadata and model config
(``INFERENCE_APIS``) need it too. Health checks stay open for load balancers.

Keys are read from a file or an environment variable, never from a config file or the command
line, and never logged: ``AccessControl.redact`` masks them in what is logged. Over HTTP a
key travels in the header ``fintwin-api-key`` (``fintwin-admin-key``), over gRPC in the
metadata ``triton-grpc-protocol-fintwin-api-key`` (where tritonserver looks for it).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fintwin.errors import FintwinInputError

logger = logging.getLogger(__name__)

API_KEY_HEADER = "fintwin-api-key"
ADMIN_KEY_HEADER = "fintwin-admin-key"
API_KEY_ENV = "FINTWIN_API_KEY"
ADMIN_KEY_ENV = "FINTWIN_ADMIN_KEY"
INFERENCE_APIS = ("inference", "metadata", "model-config")
ADMIN_APIS = ("model-repository", "shared-memory", "statistics", "trace", "logging")
# tritonserver splits its restriction flag on ',', ':' and '=': a key holds none of them
KEY_PATTERN = re.compile(r"[A-Za-z0-9._~+/-]{16,512}")
MASK = "***"
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"  # tritonserver reads gRPC restriction headers here


class SecurityError(FintwinInputError):
    """A certificate, private key or API key is missing, unreadable or unusable."""


def read_key(path: Path | None, env: str, what: str) -> str | None:
    """The key in file ``path`` (surrounding whitespace stripped), else in environment variable
    ``env``, else None. A key is 16 to 512 characters of letters, digits and ``._~+/-``."""
    if path is not None:
        try:
            key, source = Path(path).read_text().strip(), f"{what} file {path}"
            mode = Path(path).stat().st_mode
        except (OSError, UnicodeDecodeError) as exc:
            raise SecurityError(f"cannot read the {what} file {path}: {exc}") from exc
        if mode & 0o077:
            logger.warning("the %s file %s can be read by other users (mode %o): chmod 600 it",
                           what, path, mode & 0o777)
    elif os.environ.get(env):
        key, source = os.environ[env].strip(), f"{what} in ${env}"
    else:
        return None
    if not KEY_PATTERN.fullmatch(key):
        raise SecurityError(
            f"the {source} is not usable: expected 16 to 512 characters of letters, digits and "
            f"'._~+/-' (e.g. from `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            f", got {len(key)} characters"
        )
    return key


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def load_certificates(path: Path, what: str) -> list[x509.Certificate]:
    """The PEM certificates in ``path``; SecurityError naming the file when there is none."""
    try:
        certificates = x509.load_pem_x509_certificates(_read_pem(path, what))
    except ValueError as exc:
        raise SecurityError(f"the {what} {path} holds no PEM certificate: {exc}") from exc
    return certificates


def check_key_pair(cert: Path, key: Path, what: str) -> None:
    """Refuse a certificate file or an unencrypted PEM private key that cannot be read, or a key
    that is not the certificate's."""
    certificate = load_certificates(cert, f"{what} certificate")[0]
    try:
        private_key = serialization.load_pem_private_key(_read_pem(key, f"{what} key"), None)
    except (ValueError, TypeError) as exc:
        raise SecurityError(
            f"the {what} key {key} is not an unencrypted PEM private key: {exc}"
        ) from exc
    if private_key.public_key() != certificate.public_key():
        raise SecurityError(f"the {what} key {key} does not belong to the certificate {cert}")


@dataclass(frozen=True)
class ServerTls:
    """TLS of the gRPC endpoint: the server's certificate (chain) and key, all PEM; with
    ``client_ca``, mutual TLS: only clients with a certificate signed by it are served."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def check(self) -> None:
        """Refuse unreadable files and a key that is not the certificate's, naming the file."""
        check_key_pair(self.cert, self.key, "server")
        if self.client_ca is not None:
            load_certificates(self.client_ca, "client CA")

    def flags(self) -> list[str]:
        """tritonserver's TLS flags."""
        flags = [
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={Path(self.cert).resolve()}",
            f"--grpc-server-key={Path(self.key).resolve()}",
        ]
        if self.client_ca is not None:
            flags += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={Path(self.client_ca).resolve()}"]
        return flags


@dataclass(frozen=True)
class ClientTls:
    """TLS of a client: the CA bundle that signed the server's certificate (None: the system's
    trusted roots), and the client's certificate and key for mutual TLS."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise SecurityError("a client certificate needs its key and a key its certificate")

    def check(self) -> None:
        """Refuse unreadable files and a key that is not the certificate's, naming the file."""
        if self.ca is not None:
            load_certificates(self.ca, "CA bundle")
        if self.cert is not None:
            check_key_pair(self.cert, self.key, "client")

    def grpc_options(self) -> dict[str, Any]:
        """Keyword arguments of tritonclient.grpc.InferenceServerClient."""
        return {
            "ssl": True,
            "root_certificates": None if self.ca is None else str(self.ca),
            "private_key": None if self.key is None else str(self.key),
            "certificate_chain": None if self.cert is None else str(self.cert),
        }

    def http_options(self) -> dict[str, Any]:
        """Keyword arguments of tritonclient.http.InferenceServerClient (HTTPS, e.g. through
        the TLS-terminating proxy)."""
        options = {} if self.ca is None else {"ca_certs": str(self.ca)}
        if self.cert is not None:
            options |= {"certfile": str(self.cert), "keyfile": str(self.key)}
        return {"ssl": True, "ssl_options": options}


@dataclass(frozen=True)
class ClientCredentials:
    """What a client presents: TLS settings (None: plain text) and the API key (None: none)."""

    tls: ClientTls | None = None
    api_key: str | None = field(default=None, repr=False)

    def headers(self, protocol: str) -> dict[str, str] | None:
        """Request headers (``protocol`` "grpc" or "http") carrying the API key."""
        return None if self.api_key is None else key_headers(protocol, API_KEY_HEADER, self.api_key)


@dataclass(frozen=True)
class AccessControl:
    """The keys a server checks: ``api_key`` for inference (None: inference is open) and
    ``admin_key`` for the administrative APIs (always restricted)."""

    api_key: str | None = field(default=None, repr=False)
    admin_key: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)

    def restrictions(self) -> list[tuple[tuple[str, ...], str, str]]:
        """(API categories, header, expected value) of each restriction."""
        restricted = [(ADMIN_APIS, ADMIN_KEY_HEADER, self.admin_key)]
        if self.api_key is not None:
            restricted.append((INFERENCE_APIS, API_KEY_HEADER, self.api_key))
        return restricted

    def flags(self) -> list[str]:
        """tritonserver's restriction flags, for gRPC and HTTP."""
        return [
            f"--{flag}={','.join(apis)}:{header}={value}"
            for apis, header, value in self.restrictions()
            for flag in ("grpc-restricted-protocol", "http-restricted-api")
        ]

    def admin_headers(self, protocol: str) -> dict[str, str]:
        """Headers of a request (``protocol`` "grpc" or "http") to an administrative API
        (statistics, model repository, ...)."""
        return key_headers(protocol, ADMIN_KEY_HEADER, self.admin_key)

    def redact(self, text: str) -> str:
        """``text`` with every key replaced by ``MASK``."""
        return redact(text, [self.admin_key, self.api_key])


def key_headers(protocol: str, header: str, key: str) -> dict[str, str]:
    """The header carrying ``key`` under the name tritonserver checks for ``protocol``."""
    if protocol not in ("grpc", "http"):
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    return {(GRPC_HEADER_PREFIX + header if protocol == "grpc" else header): key}


def redact(text: str, secrets_: Iterable[str | None]) -> str:
    """``text`` with each non-empty secret replaced by ``MASK``."""
    for secret in secrets_:
        if secret:
            text = text.replace(secret, MASK)
    return text


def without_keys(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of an environment without the key variables (for child processes)."""
    return {name: value for name, value in env.items() if name not in (API_KEY_ENV, ADMIN_KEY_ENV)}
