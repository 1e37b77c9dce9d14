"""Identities (a certificate chain and its private key) and trust bundles (root CAs).

An :class:`Identity` is what a sidecar presents in a TLS handshake; a
:class:`TrustBundle` is what it checks the peer's chain against. Both load
from PEM files or bytes and report problems as
:class:`~quicmesh.errors.ConfigError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature

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
from quicmesh.tls.spiffe import SPIFFE_SCHEME_PREFIX, spiffe_id_of, uri_sans_of


class Identity:
    """A workload's X.509 identity: leaf certificate, intermediates and private key.

    :param certificate: the leaf certificate.
    :param private_key: the leaf's private key.
    :param chain: intermediate certificates, leaf's issuer first (the root is not needed).
    :raises ConfigError: if the private key does not belong to the certificate.
    """

    def __init__(
        self,
        certificate: x509.Certificate,
        private_key: TLSPrivateKey,
        chain: Sequence[x509.Certificate] = (),
    ) -> None:
        if public_key_der(certificate) != public_key_der(private_key):
            raise ConfigError("private key does not match the certificate")
        self._certificate = certificate
        self._private_key = private_key
        self._chain = list(chain)

    @classmethod
    def from_pem(cls, cert_chain_pem: bytes, key_pem: bytes) -> Identity:
        """Build an identity from PEM bytes.

        :param cert_chain_pem: the leaf certificate, then any intermediates.
        :param key_pem: the leaf's unencrypted private key.
        :raises ConfigError: if either cannot be parsed or they do not match.
        """
        return cls._parse(cert_chain_pem, "certificate chain", key_pem, "private key")

    @classmethod
    def from_files(
        cls, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]
    ) -> Identity:
        """Load an identity from a PEM certificate-chain file and a PEM key file.

        :param cert_path: the leaf certificate, then any intermediates.
        :param key_path: the leaf's unencrypted private key.
        :raises ConfigError: one line naming the file and the problem.
        """
        cert_name, key_name = os.fspath(cert_path), os.fspath(key_path)
        return cls._parse(read_file(cert_path), cert_name, read_file(key_path), key_name)

    @classmethod
    def _parse(
        cls, chain_pem: bytes, chain_source: str, key_pem: bytes, key_source: str
    ) -> Identity:
        certificates = parse_certificates(chain_pem, chain_source)
        key = parse_private_key(key_pem, key_source)
        if public_key_der(certificates[0]) != public_key_der(key):
            raise ConfigError(
                f"{key_source}: private key does not match the first certificate in {chain_source}"
            )
        return cls(certificates[0], key, certificates[1:])

    @property
    def certificate(self) -> x509.Certificate:
        """The leaf certificate."""
        return self._certificate

    @property
    def chain(self) -> list[x509.Certificate]:
        """The intermediate certificates (possibly empty), leaf's issuer first."""
        return list(self._chain)

    @property
    def private_key(self) -> TLSPrivateKey:
        """The leaf certificate's private key."""
        return self._private_key

    @property
    def spiffe_id(self) -> str:
        """The SPIFFE ID in the leaf certificate's URI SAN.

        :raises ConfigError: if the leaf certificate carries no ``spiffe://`` URI SAN.
        """
        spiffe_id = spiffe_id_of(self._certificate)
        if spiffe_id is None:
            raise ConfigError(
                f"certificate {self._certificate.subject.rfc4514_string()!r} "
                "carries no SPIFFE ID (no spiffe:// URI SAN)"
            )
        return spiffe_id

    def cert_chain_pem(self) -> bytes:
        """Return the leaf certificate then the intermediates, as PEM."""
        return b"".join(certificate_pem(c) for c in [self._certificate, *self._chain])

    def private_key_pem(self) -> bytes:
        """Return the private key as unencrypted PKCS#8 PEM."""
        return private_key_pem(self._private_key)

    def save(self, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> None:
        """Write the certificate chain to ``cert_path`` and the key to ``key_path`` (mode 0600).

        :raises ConfigError: if a file cannot be written.
        """
        write_file(cert_path, self.cert_chain_pem(), private=False)
        write_file(key_path, self.private_key_pem(), private=True)

    def __repr__(self) -> str:
        name = spiffe_id_of(self._certificate) or self._certificate.subject.rfc4514_string()
        return f"Identity({name!r})"


class TrustBundle:
    """The root certificates a peer's chain must lead to.

    :param certificates: one or more CA certificates.
    :raises ConfigError: if ``certificates`` is empty.
    """

    def __init__(self, certificates: Iterable[x509.Certificate]) -> None:
        self._certificates = list(certificates)
        if not self._certificates:
            raise ConfigError("trust bundle contains no certificates")

    @classmethod
    def from_pem(cls, pem: bytes) -> TrustBundle:
        """Build a trust bundle from one or more concatenated PEM certificates.

        :raises ConfigError: if ``pem`` holds no certificate.
        """
        return cls(parse_certificates(pem, "trust bundle"))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TrustBundle:
        """Load a trust bundle from a file of concatenated PEM certificates.

        :raises ConfigError: one line naming the file and the problem.
        """
        return cls(parse_certificates(read_file(path), os.fspath(path)))

    @property
    def certificates(self) -> list[x509.Certificate]:
        """The CA certificates, in file order."""
        return list(self._certificates)

    def lacks_a_root_of(self, other: TrustBundle) -> bool:
        """Whether a CA of ``other`` is not in this bundle (taken out of it: what it
        vouched for must stop being trusted, on connections and tickets too)."""
        return any(root not in self._certificates for root in other.certificates)

    def trust_domains_for(self, certificate: x509.Certificate) -> set[str | None]:
        """The trust domains of the roots that directly signed ``certificate``.

        ``certificate`` is the top of a verified chain (the leaf when the peer sent
        no intermediates). A root's trust domain is the one its
        ``spiffe://<trust domain>`` URI SAN names (as :class:`~quicmesh.tls.DevCA`
        writes it); ``None`` stands for a root that names none, which vouches for
        any trust domain. When no root signed ``certificate`` (intermediates not
        known here), every root's domain is returned.
        """
        roots = [root for root in self._certificates if _signed(root, certificate)]
        return {_root_trust_domain(root) for root in roots or self._certificates}

    @property
    def pem(self) -> bytes:
        """All certificates as concatenated PEM (what ``cadata`` parameters take)."""
        return b"".join(certificate_pem(c) for c in self._certificates)

    def __repr__(self) -> str:
        names = ", ".join(c.subject.rfc4514_string() for c in self._certificates)
        return f"TrustBundle([{names}])"


def _root_trust_domain(root: x509.Certificate) -> str | None:
    for uri in uri_sans_of(root):
        if uri.startswith(SPIFFE_SCHEME_PREFIX):
            domain = uri[len(SPIFFE_SCHEME_PREFIX) :].partition("/")[0]
            if domain:
                return domain
    return None


def _signed(root: x509.Certificate, certificate: x509.Certificate) -> bool:
    if root == certificate:
        return True
    try:
        certificate.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
