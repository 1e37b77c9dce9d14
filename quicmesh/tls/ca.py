"""A development certificate authority that issues SPIFFE X.509 identities.

:class:`DevCA` is a self-signed root kept in memory (optionally saved to a
directory) for tests, benchmarks and local meshes. It is not a production CA:
there is no revocation, no rotation and the key sits in a plain file.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from quicmesh.errors import ConfigError
from quicmesh.tls._pem import (
    TLSPrivateKey,
    certificate_pem,
    parse_certificates,
    parse_private_key,
    private_key_pem,
    public_key_der,
    read_file,
    write_file,
)
from quicmesh.tls.identity import Identity, TrustBundle
from quicmesh.tls.spiffe import (
    SPIFFE_SCHEME_PREFIX,
    spiffe_id_of,
    trust_domain_of,
    validate_spiffe_id,
)

DEFAULT_TRUST_DOMAIN = "mesh.local"
"""The trust domain a :class:`DevCA` serves unless told otherwise."""

CA_COMMON_NAME = "quicmesh development CA"
"""The subject common name of every :class:`DevCA` root."""

CA_CERT_FILE = "ca.pem"
"""File name of the CA certificate inside a :meth:`DevCA.save` directory."""

CA_KEY_FILE = "ca-key.pem"
"""File name of the CA private key inside a :meth:`DevCA.save` directory (mode 0600)."""

CA_VALIDITY = datetime.timedelta(days=3650)
"""How long a new :class:`DevCA` root is valid."""

CLOCK_SKEW_ALLOWANCE = datetime.timedelta(minutes=5)
"""How far before "now" certificates start being valid, to tolerate clock skew."""


class DevCA:
    """A self-signed EC P-256 root CA for one SPIFFE trust domain.

    The root certificate carries the trust domain's SPIFFE ID
    (``spiffe://<trust domain>``) as its URI SAN, so :meth:`load` can recover it.

    :param trust_domain: the SPIFFE trust domain whose identities this CA issues.
    :raises ValueError: if ``trust_domain`` is not a valid SPIFFE trust domain.
    """

    def __init__(self, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
        trust_domain_id = _trust_domain_id(trust_domain)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
        public_key = key.public_key()
        self._certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(trust_domain_id)]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        self._private_key: TLSPrivateKey = key
        self._trust_domain = trust_domain

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> DevCA:
        """Load a CA written by :meth:`save` from ``directory``.

        :raises ConfigError: one line naming the file: missing or unreadable, not PEM,
            not a CA certificate, or the key does not match the certificate.
        """
        cert_path = Path(directory) / CA_CERT_FILE
        key_path = Path(directory) / CA_KEY_FILE
        certificate = parse_certificates(read_file(cert_path), str(cert_path))[0]
        key = parse_private_key(read_file(key_path), str(key_path))
        if public_key_der(certificate) != public_key_der(key):
            raise ConfigError(f"{key_path}: private key does not match the certificate {cert_path}")
        try:
            is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ConfigError(f"{cert_path}: not a CA certificate (basicConstraints CA is not set)")
        trust_domain = DEFAULT_TRUST_DOMAIN
        spiffe_id = spiffe_id_of(certificate)
        if spiffe_id is not None:
            try:
                trust_domain = trust_domain_of(spiffe_id)
            except ValueError as exc:
                raise ConfigError(f"{cert_path}: {exc}") from exc
        ca = cls.__new__(cls)
        ca._certificate = certificate
        ca._private_key = key
        ca._trust_domain = trust_domain
        return ca

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``ca.pem`` and ``ca-key.pem`` (mode 0600) into ``directory``, creating it.

        :raises ConfigError: if the directory or a file cannot be written.
        """
        path = Path(directory)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot create directory: {exc.strerror or exc}") from exc
        write_file(path / CA_CERT_FILE, certificate_pem(self._certificate), private=False)
        write_file(path / CA_KEY_FILE, private_key_pem(self._private_key), private=True)

    @property
    def trust_domain(self) -> str:
        """The SPIFFE trust domain this CA issues identities for, e.g. ``"mesh.local"``."""
        return self._trust_domain

    @property
    def certificate(self) -> x509.Certificate:
        """The self-signed root certificate."""
        return self._certificate

    @property
    def private_key(self) -> TLSPrivateKey:
        """The root's private key (for tests that need to sign unusual certificates)."""
        return self._private_key

    @property
    def trust_bundle(self) -> TrustBundle:
        """A trust bundle holding just this CA's certificate."""
        return TrustBundle([self._certificate])

    def issue(
        self,
        spiffe_id: str,
        validity: datetime.timedelta = datetime.timedelta(days=1),
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> Identity:
        """Issue a leaf identity (EC P-256 key) for ``spiffe_id``.

        The leaf's only subject alternative name is the SPIFFE ID; it may be used
        as a TLS client and server certificate.

        :param spiffe_id: the workload's SPIFFE ID, in this CA's trust domain.
        :param validity: how long after now the certificate stays valid.
        :param not_before: start of validity (default: now minus five minutes).
        :param not_after: end of validity, overriding ``validity`` (e.g. in the past, for tests).
        :raises ValueError: if ``spiffe_id`` is invalid or outside this CA's trust domain,
            or the validity period is empty.
        """
        validate_spiffe_id(spiffe_id)
        if trust_domain_of(spiffe_id) != self._trust_domain:
            raise ValueError(
                f"SPIFFE ID {spiffe_id!r} is not in this CA's trust domain {self._trust_domain!r}"
            )
        now = datetime.datetime.now(datetime.UTC)
        start = not_before if not_before is not None else now - CLOCK_SKEW_ALLOWANCE
        end = not_after if not_after is not None else now + validity
        if end <= start:
            raise ValueError(f"certificate validity ends ({end}) before it starts ({start})")
        key = ec.generate_private_key(ec.SECP256R1())
        public_key = key.public_key()
        ca_ski = self._certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "quicmesh")]))
            .issuer_name(self._certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
                critical=False,
            )
            .sign(self._private_key, _signature_hash(self._private_key))
        )
        return Identity(certificate, key)

    def __repr__(self) -> str:
        return f"DevCA(trust_domain={self._trust_domain!r})"


def _trust_domain_id(trust_domain: str) -> str:
    """Return ``spiffe://<trust_domain>``; ValueError if it is not a valid trust domain."""
    if "/" in trust_domain:
        raise ValueError(f"invalid SPIFFE trust domain {trust_domain!r}: it may not contain '/'")
    return validate_spiffe_id(SPIFFE_SCHEME_PREFIX + trust_domain)


def _signature_hash(key: TLSPrivateKey) -> hashes.SHA256 | None:
    """Return the digest to sign with: SHA-256, or none for Ed25519/Ed448 (they hash internally)."""
    return (
        None
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
        else hashes.SHA256()
    )


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    """Return a KeyUsage extension with only the named bits set."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )
