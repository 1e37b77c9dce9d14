"""Reading and writing PEM files, with errors that name the file.

Everything here raises :class:`~quicmesh.errors.ConfigError` with a one-line
message starting with the file (or other source) it is about.
"""

from __future__ import annotations

import os

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from quicmesh.errors import ConfigError

TLSPrivateKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
"""The private key types a TLS 1.3 certificate can be used with."""

_TLS_PRIVATE_KEY_CLASSES = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


MAX_FILE_BYTES = 16 * 2**20
"""The largest certificate, key or trust bundle file read (``/dev/zero`` is not one)."""


def read_file(path: str | os.PathLike[str], limit: int = MAX_FILE_BYTES) -> bytes:
    """Return the contents of ``path``, at most ``limit`` bytes; ConfigError naming it if
    it cannot be read or is larger."""
    try:
        with open(path, "rb") as file:
            data = file.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"{os.fspath(path)}: cannot read: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise ConfigError(f"{os.fspath(path)}: cannot read: larger than {limit:,} bytes")
    return data


def write_file(path: str | os.PathLike[str], data: bytes, *, private: bool) -> None:
    """Write ``data`` to ``path``; mode 0600 if ``private`` (also when it already exists)."""
    mode = 0o600 if private else 0o644
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as file:
            if private:
                os.fchmod(file.fileno(), mode)
            file.write(data)
    except OSError as exc:
        raise ConfigError(f"{os.fspath(path)}: cannot write: {exc.strerror or exc}") from exc


def parse_certificates(data: bytes, source: str) -> list[x509.Certificate]:
    """Parse one or more PEM certificates; ConfigError naming ``source`` if there are none."""
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{source}: not a PEM certificate file ({exc})") from exc
    if not certificates:  # pragma: no cover - cryptography raises instead
        raise ConfigError(f"{source}: contains no PEM certificate")
    return certificates


def parse_private_key(data: bytes, source: str) -> TLSPrivateKey:
    """Parse an unencrypted PEM private key; ConfigError naming ``source`` on any problem."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise ConfigError(f"{source}: encrypted private keys are not supported") from exc
    except ValueError as exc:
        raise ConfigError(f"{source}: not a PEM private key") from exc
    except UnsupportedAlgorithm as exc:
        raise ConfigError(f"{source}: unsupported private key ({exc})") from exc
    if not isinstance(key, _TLS_PRIVATE_KEY_CLASSES):
        raise ConfigError(f"{source}: {type(key).__name__} keys cannot be used for TLS 1.3")
    return key


def public_key_der(key: TLSPrivateKey | x509.Certificate) -> bytes:
    """Return the DER SubjectPublicKeyInfo of a private key or a certificate."""
    public_key = key.public_key()
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_key_pem(key: TLSPrivateKey) -> bytes:
    """Return ``key`` as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate_pem(certificate: x509.Certificate) -> bytes:
    """Return ``certificate`` as PEM."""
    return certificate.public_bytes(serialization.Encoding.PEM)
